"""The service behind the routes: readiness, one batcher per model and endpoint, request execution and metrics."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.batcher import BatchFailed, Batcher, DeadlineExceeded, Draining, NullObserver, QueueFull
from server.engine import Engine, ServedModel
from server.jobs import (
    EditJob,
    EditRefineJob,
    GenerateJob,
    RefinedImage,
    RefineJob,
    RefineProgress,
    run_splitting_on_oom,
)
from server.lanes import BACKGROUND, INTERACTIVE, DeviceLanes
from server.metrics import Metrics
from server.settings import Settings
from softdimo import editing
from softdimo.conditioning import ConditionError
from softdimo.draw_check import DRAWS_SEEN
from softdimo.images import encode_image
from softdimo.seeding import MAX_SEED, request_seeds
from softdimo.tteo import Chunks, TTEOSettings

log = logging.getLogger("softdimo.service")

GENERATE = "/generate"
REFINE = "/refine"
OPENAI = "/v1/images/generations"
EDIT = "/edit"
OPENAI_EDITS = "/v1/images/edits"
ENDPOINTS = (GENERATE, REFINE, OPENAI, EDIT, OPENAI_EDITS)
MODEL_THREAD = "softdimo-model"  # name prefix of the one thread that runs batches
# Up to this many pixels a request's images are encoded on the event loop: four 64x64 images, about 0.1 ms each for a
# Shapes image as PNG (3 ms for four of noise), where a hop to a thread and back took 10 ms on average under load.
INLINE_ENCODE_PIXELS = 4 * 64 * 64
REQUEST_TIMEOUT = -1.0  # as a `timeout_s`: the settings' request_timeout_s (None: no deadline, as for jobs)


class ServiceError(Exception):
    """An error with the HTTP status and message the client gets; `headers` carries e.g. Retry-After."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, *, code: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.code = code  # the OpenAI error object's `code` under /v1/, when the status alone does not say it


@dataclass
class GeneratedImages:
    model: str
    images: list[np.ndarray]
    seeds: list[int]
    queue_s: float
    compute_s: float
    refined: list[RefinedImage] | None = None  # /refine only: rewards and chosen candidates, per image


def job_cost(model: ServedModel, job: GenerateJob | RefineJob | EditJob | EditRefineJob) -> int:
    """images x steps x best_of: the teacher's sampling steps or the TTEO steps; a one-step /generate or /edit is
    1 step."""
    if isinstance(job, (RefineJob, EditRefineJob)):
        return job.n * job.settings.steps * job.settings.best_of
    if model.kind == "masked-diffusion":
        return job.n * (job.steps or model.defaults["steps"])
    return job.n


def _timed(run, jobs):
    """Run a batch; each job's output comes back with the batch's compute time."""
    began = time.perf_counter()
    outputs = run(jobs)
    seconds = time.perf_counter() - began
    return [(output, seconds) for output in outputs]


class _BatchMetrics(NullObserver):
    """Feeds one batcher's queue and batch events into the Prometheus metrics."""

    def __init__(self, metrics: Metrics, endpoint: str, model: str, lane: str):
        self.metrics, self.endpoint, self.model, self.lane = metrics, endpoint, model, lane

    def queue_depth(self, images: int) -> None:
        self.metrics.queue_depth.labels(self.endpoint, self.model).set(images)

    def queue_wait(self, seconds: float) -> None:
        self.metrics.queue_wait.labels(self.endpoint, self.model, self.lane).observe(seconds)

    def batch_executed(self, images: int, requests: int, seconds: float) -> None:
        self.metrics.batch_size.labels(self.endpoint, self.model).observe(images)

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.endpoint, reason).inc()


class Service:
    """Owns the engine, its batchers and the readiness state; the routes only translate HTTP."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        start_jobs: Callable[[Service], Awaitable] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self._batchers: dict[tuple[str, str, str], Batcher] = {}
        # One thread for all model work: batches of different models and endpoints take turns on the device,
        # interactive ones first (server/lanes.py).
        self._lanes = DeviceLanes(burst=settings.interactive_burst, thread_name=MODEL_THREAD)
        self._executor = self._lanes.executor(INTERACTIVE)
        # The JobRunner (server/job_runner.py), started by `start_jobs` once the batchers run; it uses this class.
        self._start_jobs = start_jobs
        self.jobs = None

    # ------------------------------------------------------------ lifecycle
    async def start(self, engine: Engine | None = None) -> None:
        """Load (unless given), warm up and start batching; readiness turns true only at the end."""
        loop = asyncio.get_running_loop()
        try:
            if engine is None:
                settings = self.settings
                load = functools.partial(
                    Engine.load,
                    settings.weights,
                    settings.device,
                    runtime=settings.runtime(),
                    max_batch_size=settings.max_batch_size,
                )
                engine = await loop.run_in_executor(self._executor, load)
            await loop.run_in_executor(self._executor, engine.warm_up, self.settings.max_batch_size)
        except Exception as exc:  # the process stays alive and unready, saying why on /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.load_error)
            raise
        self.engine = engine
        self.metrics.declare(list(ENDPOINTS), list(engine.models))
        # A /refine batch computes for seconds: interactive batches waiting meanwhile run between its pieces of work.
        chunks = Chunks(self.settings.refine_chunk_on(engine.device.type), self._lanes.run_waiting_interactive)
        for model in engine.models.values():
            await self._add_batcher(GENERATE, model, model.generate_batch, INTERACTIVE)
            await self._add_batcher(GENERATE, model, model.generate_batch, BACKGROUND)  # jobs
            if model.rewards:
                refine_batch = functools.partial(model.refine_batch, chunks=chunks)
                await self._add_batcher(REFINE, model, refine_batch, BACKGROUND)
            if model.edits:  # edits batch apart from /generate: each image carries its own source and mask
                await self._add_batcher(EDIT, model, model.edit_batch, INTERACTIVE)
            if model.edits and model.rewards:  # edits with `refine`, batched as /refine is
                refine_edit_batch = functools.partial(model.refine_edit_batch, chunks=chunks)
                await self._add_batcher(EDIT, model, refine_edit_batch, BACKGROUND, refine=True)
        if self._start_jobs is not None:
            try:
                self.jobs = await self._start_jobs(self)
            except Exception as exc:  # e.g. an unreachable Redis: unready, saying why on /readyz
                self.load_error = f"job store: {type(exc).__name__}: {exc}"
                log.error("the job store could not be opened: %s", self.load_error)
                raise
        # A drain that began while the models were loading keeps the server unready.
        self.ready = not self.draining

    async def _add_batcher(
        self,
        endpoint: str,
        model: ServedModel,
        run_batch,
        lane: str,
        *,
        refine: bool | None = None,
    ) -> None:
        """A batcher for `endpoint`'s work on `model` in `lane`; `refine` (by default: for /refine) batches compute
        for seconds, so they always wait refine_max_wait_ms for company."""
        splits = self.metrics.batch_splits.labels(endpoint, model.name)
        drawn = self.metrics.checked_draws.labels(endpoint, model.name)

        def run(jobs):  # a batch that runs out of memory is retried in halves before any request fails
            counting = DRAWS_SEEN.set(lambda draws: drawn.inc(int(draws.sum())))
            try:
                return _timed(lambda jobs: run_splitting_on_oom(run_batch, jobs, on_split=splits.inc), jobs)
            finally:
                DRAWS_SEEN.reset(counting)

        refine = endpoint == REFINE if refine is None else refine
        batcher = Batcher(
            run,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=(self.settings.refine_max_wait_ms if refine else self.settings.max_wait_ms) / 1000,
            skip_wait_when_sparse=not refine,
            max_queue=max(self.settings.max_queue, self.settings.max_batch_size),
            size_of=lambda job: job.n,
            cost_of=lambda job: job_cost(model, job),
            max_queue_cost=self.settings.max_queue_cost,
            # A batch runs one set of sampling steps (teachers) or one set of TTEO settings and reward (/refine);
            # requests that differ wait in arrival order for a batch of their own.
            key_of=lambda job: job.key,
            executor=self._lanes.executor(lane),
            observer=_BatchMetrics(self.metrics, endpoint, model.name, lane),
            name=f"{endpoint}:{model.name}:{lane}",
        )
        await batcher.start()
        self._batchers[(endpoint, model.name, lane)] = batcher

    def begin_drain(self) -> None:
        """From now on refuse new work (503) and report unready; queued and running work carries on."""
        self.draining = True
        self.ready = False

    async def stop(self) -> None:
        """Refuse new work, let queued and running batches finish within the drain timeout; queued jobs stay in
        their store for the next process, running ones finish (or go back to the queue when they cannot)."""
        self.begin_drain()
        if self.jobs is not None:
            self.jobs.stop_claiming()
        await asyncio.gather(
            *(b.stop(drain=True, timeout_s=self.settings.drain_timeout_s) for b in self._batchers.values())
        )
        if self.jobs is not None:
            await self.jobs.stop()
        self._lanes.shutdown(wait=False, cancel_futures=True)

    async def abort(self) -> None:
        """Stop at once: queued work fails with 503, and the batch in progress is no longer waited for."""
        self.begin_drain()
        if self.jobs is not None:
            self.jobs.stop_claiming()
        await asyncio.gather(*(b.stop(drain=False, timeout_s=0) for b in self._batchers.values()))
        if self.jobs is not None:
            await self.jobs.stop(grace_s=0)
        self._lanes.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ requests
    def model(self, name: str | None, *, endpoint: str) -> ServedModel:
        if self.draining:
            self.metrics.rejected.labels(endpoint, "draining").inc()
            raise ServiceError(503, "the server is draining for shutdown", {"Retry-After": "1"})
        if not self.ready or self.engine is None:
            raise ServiceError(503, "the server is not ready yet: models are loading", {"Retry-After": "5"})
        return self.loaded_model(name)

    def loaded_model(self, name: str | None) -> ServedModel:
        """A loaded model by name (the default for None), whether or not new work is admitted: a job taken from the
        store runs during a drain. 404 for a name this process does not serve."""
        if self.engine is None:
            raise ServiceError(503, "the server is not ready yet: models are loading", {"Retry-After": "5"})
        name = self.engine.default_model if name is None else name
        if name not in self.engine.models:
            raise ServiceError(404, f"unknown model {name!r}; loaded models: {', '.join(self.engine.models)}")
        return self.engine.models[name]

    @staticmethod
    def condition(model: ServedModel, prompt: str | None, class_label: int | None) -> torch.Tensor:
        try:
            return model.conditioner.request(prompt, class_label)
        except ConditionError as exc:
            raise ServiceError(422, f"model {model.name!r}: {exc}") from exc

    @staticmethod
    def first_seed(seed: int | None) -> int:
        """The request's first seed, or a random one; the images' seeds follow it, wrapping below 2^63."""
        return secrets.randbelow(MAX_SEED) if seed is None else seed

    def generate_job(
        self,
        *,
        model: ServedModel,
        condition: torch.Tensor,
        seed: int,
        n: int,
        steps: int | None,
    ) -> GenerateJob:
        """A /generate request's work, checked before anything is queued: 4xx here, not later."""
        self._check_sampling_steps(model, steps)
        job = GenerateJob(condition=condition, seed=seed, n=n, steps=steps)
        self._check_cost(model, job)
        return job

    async def generate(
        self,
        *,
        model: ServedModel,
        job: GenerateJob,
        lane: str = INTERACTIVE,
        timeout_s: float | None = REQUEST_TIMEOUT,
    ) -> GeneratedImages:
        """Run a checked /generate job in `lane`, failing with 504 after `timeout_s` (None: no deadline)."""
        parts = self._chunks(job)
        results, queue_s, compute_s = await self._run(GENERATE, model, parts, lane=lane, timeout_s=timeout_s)
        images = [image for result in results for image in result]
        return GeneratedImages(model=model.name, images=images, seeds=job.seeds, queue_s=queue_s, compute_s=compute_s)

    def edit_job(
        self,
        *,
        model: ServedModel,
        image: np.ndarray,
        mask: np.ndarray | None,
        strength: float | None,
        condition: torch.Tensor,
        seed: int,
        n: int,
        steps: int | None,
    ) -> EditJob:
        """An /edit request's work, checked before anything is queued: 4xx here, not later. `mask` (H, W) bool, True
        where to repaint; without one, `strength` (editing.DEFAULT_STRENGTH when None), by seed. Which tokens either
        repaints is the model's rule (its pipeline's `repaint_from_mask`, `repaint_at_strength`)."""
        if not model.edits:
            raise ServiceError(422, f"model {model.name!r} does not edit images")
        self._check_sampling_steps(model, steps)
        pipeline, tokens = model.pipeline, model.pipeline.tokenizer.cfg.grid**2
        if mask is not None:
            if not mask.any():
                raise ServiceError(422, "nothing to edit: the mask has no white pixel")
            repaint = pipeline.repaint_from_mask(mask[None]).expand(n, tokens)
            if not repaint.any():
                raise ServiceError(422, f"nothing to edit: the mask's white pixels repaint none of the {tokens} tokens")
        else:
            strength = editing.DEFAULT_STRENGTH if strength is None else strength
            repaint = pipeline.repaint_at_strength(request_seeds(seed, n), strength, steps)
            if not repaint.any():
                raise ServiceError(422, f"nothing to edit: strength {strength} repaints none of the {tokens} tokens")
        job = EditJob(
            image=image,
            repaint=repaint,
            condition=condition,
            seed=seed,
            n=n,
            steps=steps,
            strength=None if mask is not None else strength,
        )
        self._check_cost(model, job)
        return job

    async def edit(
        self,
        *,
        model: ServedModel,
        job: EditJob,
        timeout_s: float | None = REQUEST_TIMEOUT,
    ) -> GeneratedImages:
        """Run a checked /edit job, failing with 504 after `timeout_s` (None: no deadline)."""
        parts = self._chunks(job)
        results, queue_s, compute_s = await self._run(EDIT, model, parts, lane=INTERACTIVE, timeout_s=timeout_s)
        images = [image for result in results for image in result]
        return GeneratedImages(model=model.name, images=images, seeds=job.seeds, queue_s=queue_s, compute_s=compute_s)

    def refine_job(
        self,
        *,
        model: ServedModel,
        condition: torch.Tensor,
        text: str,
        seed: int,
        n: int,
        steps: int | None,
        lr: float | None,
        best_of: int | None,
        reward: str | None,
        progress: RefineProgress | None = None,
    ) -> RefineJob:
        """A /refine request's work, checked before anything is queued (or streamed): 4xx here, not later.
        Settings the request leaves out (None) are the model's (`TTEOSettings.for_request`)."""
        settings, reward = self._tteo_settings(model, steps=steps, lr=lr, best_of=best_of, reward=reward)
        job = RefineJob(
            condition=condition, text=text, seed=seed, n=n, settings=settings, reward=reward, progress=progress
        )
        self._check_cost(model, job)
        return job

    def edit_refine_job(
        self,
        *,
        model: ServedModel,
        edit: EditJob,
        text: str,
        steps: int | None,
        lr: float | None,
        best_of: int | None,
        reward: str | None,
        progress: RefineProgress | None = None,
    ) -> EditRefineJob:
        """An /edit request with `refine`: its checked edit, with TTEO settings checked as /refine's."""
        settings, reward = self._tteo_settings(model, steps=steps, lr=lr, best_of=best_of, reward=reward)
        job = EditRefineJob(edit=edit, text=text, settings=settings, reward=reward, progress=progress)
        self._check_cost(model, job)
        return job

    @staticmethod
    def _tteo_settings(
        model: ServedModel,
        *,
        steps: int | None,
        lr: float | None,
        best_of: int | None,
        reward: str | None,
    ) -> tuple[TTEOSettings, str]:
        """A request's TTEO settings and reward name (the model's where it leaves them out), or a 4xx."""
        if not model.rewards:
            raise ServiceError(
                422, f"model {model.name!r} is {model.kind} without a reward: TTEO needs a one-step model with one"
            )
        reward = model.rewards[0] if reward is None else reward
        if reward not in model.rewards:
            raise ServiceError(404, f"unknown reward {reward!r}; model {model.name!r} has: {', '.join(model.rewards)}")
        return model.pipeline.tteo.for_request(steps=steps, lr=lr, best_of=best_of), reward

    async def refine(
        self,
        *,
        model: ServedModel,
        job: RefineJob | EditRefineJob,
        timeout_s: float | None = REQUEST_TIMEOUT,
    ) -> GeneratedImages:
        """Run a checked /refine job, or an /edit job with `refine`, in the background lane."""
        n = job.n
        parts = self._chunks(job)
        endpoint = EDIT if isinstance(job, EditRefineJob) else REFINE
        results, queue_s, compute_s = await self._run(endpoint, model, parts, lane=BACKGROUND, timeout_s=timeout_s)
        refined = [item for result in results for item in result]
        self.metrics.tteo_steps.labels(model.name).inc(job.settings.steps * n)
        for item in refined:
            self.metrics.reward_gain.labels(model.name).observe(item.reward_after - item.reward_before)
        return GeneratedImages(
            model=model.name,
            images=[r.image for r in refined],
            seeds=job.seeds,
            queue_s=queue_s,
            compute_s=compute_s,
            refined=refined,
        )

    @staticmethod
    def _check_sampling_steps(model: ServedModel, steps: int | None) -> None:
        if steps is not None and model.kind != "masked-diffusion":
            raise ServiceError(422, f"model {model.name!r} is one-step: steps applies only to masked-diffusion models")

    def _check_cost(self, model: ServedModel, job: GenerateJob | RefineJob | EditJob | EditRefineJob) -> None:
        cost, limit = job_cost(model, job), self.settings.max_request_cost
        if cost <= limit:
            return
        if isinstance(job, (RefineJob, EditRefineJob)):
            terms = f"{job.n} images x {job.settings.steps} TTEO steps x best_of {job.settings.best_of}"
        else:
            terms = f"{job.n} images x {cost // job.n} sampling steps"
        raise ServiceError(
            422, f"this request costs {terms} = {cost}, over max_request_cost = {limit}; ask for fewer images or steps"
        )

    def _chunks(self, job: GenerateJob | RefineJob | EditJob | EditRefineJob) -> list:
        """Parts of a request of at most a batch each: one larger than a batch runs as several, seeds staying per image."""
        parts = []
        while job.n > self.settings.max_batch_size:
            head, job = job.split(self.settings.max_batch_size)
            parts.append(head)
        return [*parts, job]

    async def _run(
        self,
        endpoint: str,
        model: ServedModel,
        jobs: list,
        *,
        lane: str,
        timeout_s: float | None,
    ) -> tuple[list, float, float]:
        """Run a request's jobs through the model's batcher: (outputs per job, queue seconds, compute seconds)."""
        batcher = self._batchers[(endpoint, model.name, lane)]
        timeout_s = self.settings.request_timeout_s if timeout_s == REQUEST_TIMEOUT else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        began = time.perf_counter()
        results = await self._submit_all(batcher, jobs, deadline)
        total = time.perf_counter() - began
        compute = max(seconds for _, seconds in results)
        return [output for output, _ in results], max(0.0, total - compute), compute

    async def _submit_all(self, batcher: Batcher, jobs: list, deadline: float | None) -> list:
        """Submit a request's parts; map batcher outcomes to HTTP errors. If one part fails, the rest are cancelled."""
        tasks = [asyncio.ensure_future(batcher.submit(job, deadline=deadline)) for job in jobs]
        try:
            return await asyncio.gather(*tasks)
        except QueueFull as exc:
            what = "images" if exc.limit == "max_queue" else "cost"
            detail = f"the queue is full ({exc.limit} = {exc.value} {what} per model and endpoint); retry later"
            raise ServiceError(429, detail, {"Retry-After": str(math.ceil(exc.retry_after_s))}) from exc
        except DeadlineExceeded as exc:
            raise ServiceError(504, f"not served within {self.settings.request_timeout_s:g}s") from exc
        except Draining as exc:
            raise ServiceError(503, "the server is draining for shutdown", {"Retry-After": "1"}) from exc
        except BatchFailed as exc:
            raise ServiceError(500, str(exc)) from exc
        finally:
            for task in tasks:  # no-op for finished parts; stops the rest after a failure or a disconnect
                task.cancel()

    # ------------------------------------------------------------ encoding
    @staticmethod
    async def encode(images: list[np.ndarray], fmt: str) -> list[bytes]:
        """Encode on the event loop when the images are small, off it otherwise: a hop to a worker thread and back
        costs more than encoding a few small images under load (it waits for the GIL beside the batch running on
        the device thread), while compressing large images there would stall every connection."""
        if sum(im.shape[0] * im.shape[1] for im in images) <= INLINE_ENCODE_PIXELS:
            return [encode_image(im, fmt) for im in images]
        return await asyncio.to_thread(lambda: [encode_image(im, fmt) for im in images])

    @staticmethod
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"
