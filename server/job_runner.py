"""Durable jobs: checked and stored at submit, claimed from the store by whichever process is free, run through the
same batchers as the synchronous endpoints (in the background lane), finished with a result and an optional webhook."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from server.job_store import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobStore,
    RedisJobStore,
    SQLiteJobStore,
)
from server.jobs import RefineProgress
from server.lanes import BACKGROUND
from server.schemas import GenerateRequest, JobResponse, RefineRequest
from server.service import GENERATE, REFINE, Service, ServiceError
from server.settings import Settings
from server.webhooks import WebhookRefused, WebhookSender, check_target
from server.work import encoded, generate_job, generate_response, refine_job, refine_response

log = logging.getLogger("softdimo.jobs")

JOBS_PATH = "/v1/jobs"
_IDLE_POLL_S = 0.5  # how often an idle process looks for jobs another process stored (or a dead one left)
_PROGRESS_EVERY_S = 0.1  # progress is written to the store at most this often per job (and at the last step)
_PURGE_EVERY_S = 60.0
_COUNT_QUEUED_EVERY_S = 5.0  # softdimo_jobs_queued's refresh: a third of the scrape and KEDA polling intervals


def open_store(settings: Settings) -> JobStore:
    if settings.job_store == "redis":
        return RedisJobStore(settings.redis_url)
    return SQLiteJobStore(settings.job_db_path)


def owner_of(api_key: str | None) -> str | None:
    """Whom a job is counted against: a digest of the API key (never the key itself), or no one without a key."""
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


def job_response(job: JobRecord) -> JobResponse:
    return JobResponse(
        id=job.id,
        endpoint=job.endpoint,
        status=job.status,
        created=int(job.created),
        progress=job.progress,
        result=job.result,
        error=job.error,
    )


@dataclass(eq=False)
class _Running:
    """A job this process runs: its task, and how to stop its images at the next step."""

    job: JobRecord
    task: asyncio.Task | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False  # handed back to the queue: a drain
    lost: bool = False  # another process holds it now (this one's lease ran out): its outcome is theirs to store

    def cancel(self) -> None:
        self.cancelled.set()  # TTEO stops at its next step; the task's cancellation drops queued parts
        if self.task is not None:
            self.task.cancel()


def _gave_up(deaths: int) -> dict:
    return {
        "status": 500,
        "detail": f"the process running this job stopped {deaths} times before it finished (a crash, an out-of-memory"
        " kill or kill -9): it is not run again",
    }


class JobRunner:
    """Claims jobs from the store while fewer than job_concurrency run here; keeps each claim's lease alive while
    it runs, so a job whose process dies is claimed again by the next one (at least once, same seed, same images)."""

    def __init__(self, service: Service, store: JobStore):
        self.service, self.store, self.settings = service, store, service.settings
        self.worker = f"{uuid.uuid4().hex[:12]}"
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._claiming = True
        self._loop_task: asyncio.Task | None = None
        settings = self.settings
        self.webhooks = WebhookSender(
            secret=settings.webhook_secret,
            attempts=settings.webhook_attempts,
            backoff_s=settings.webhook_backoff_s,
            timeout_s=settings.webhook_timeout_s,
            allow_private=settings.webhook_allow_private,
            metrics=service.metrics,
        )

    @classmethod
    async def start(cls, service: Service) -> JobRunner:
        store = await asyncio.to_thread(open_store, service.settings)
        runner = cls(service, store)
        runner._loop_task = asyncio.create_task(runner._claim_loop(), name="softdimo-jobs")
        return runner

    # ------------------------------------------------------------ requests
    async def submit(self, body: GenerateRequest | RefineRequest, *, webhook: str | None = None) -> JobRecord:
        """Check a /generate or /refine body as its synchronous endpoint would (same 4xx), fix its seed, and store
        it as a queued job."""
        service = self.service
        refine = isinstance(body, RefineRequest)
        if refine and body.stream:
            raise ServiceError(422, "stream does not apply to a job: follow GET /v1/jobs/{id}/events instead")
        model = service.model(body.model, endpoint=REFINE if refine else GENERATE)
        request = body.model_dump(exclude={"endpoint", "webhook", "stream"}, exclude_none=True)
        request["seed"] = service.first_seed(body.seed)  # so that a job run again draws the same images
        if refine:
            refine_job(service, model, RefineRequest.model_validate(request))
        else:
            generate_job(service, model, GenerateRequest.model_validate(request))
        if webhook is not None:
            if self.settings.webhook_secret is None:
                raise ServiceError(
                    422, "this server has no webhook secret (SOFTDIMO_WEBHOOK_SECRET): it cannot sign webhooks"
                )
            try:
                await asyncio.to_thread(check_target, webhook, allow_private=self.settings.webhook_allow_private)
            except WebhookRefused as exc:
                raise ServiceError(422, str(exc)) from None
        job = JobRecord(
            id=service.new_id("job"),
            endpoint="refine" if refine else "generate",
            body=request,
            created=time.time(),
            webhook=webhook,
            owner=owner_of(self.settings.api_key),
        )
        limit = self.settings.max_queued_jobs_per_key if job.owner is not None else None
        if not await asyncio.to_thread(self.store.add, job, max_queued_per_owner=limit):
            detail = f"this API key has {limit} queued jobs (max_queued_jobs_per_key); wait for some to start"
            raise ServiceError(429, detail, {"Retry-After": "5"})
        service.metrics.jobs_submitted.labels(job.endpoint).inc()
        await self._count_queued()
        self._wake.set()
        return job

    async def get(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise ServiceError(404, f"no job {job_id!r} (unknown, or finished and expired)", code="job_not_found")
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; a finished one is left as it is (409)."""
        job = await asyncio.to_thread(self.store.cancel, job_id, ttl_s=self.settings.job_result_ttl_s)
        if job is None:
            raise ServiceError(404, f"no job {job_id!r} (unknown, or finished and expired)", code="job_not_found")
        if job.status != CANCELLED:
            raise ServiceError(409, f"job {job_id!r} has already {job.status}: there is nothing to cancel")
        running = self._running.get(job_id)
        if running is not None:  # run here; another process hears it from its next lease renewal
            running.cancel()
        return job

    # ------------------------------------------------------------ lifecycle
    def stop_claiming(self) -> None:
        """A drain: take no more jobs; queued ones stay in the store for the next process."""
        self._claiming = False
        self._wake.set()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """After the batchers drained: give running jobs `grace_s` to store their results; the rest go back to the
        queue. Then close webhooks and the store."""
        self.stop_claiming()
        if self._loop_task is not None:
            await asyncio.wait({self._loop_task})
        tasks = {r.task for r in self._running.values() if r.task is not None}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s) if grace_s > 0 else (set(), tasks)
            for running in list(self._running.values()):
                if running.task in late:
                    running.released = True
                    running.task.cancel()
            if late:
                await asyncio.wait(late)
        await self.webhooks.close(grace_s=grace_s)
        await asyncio.to_thread(self.store.close)

    async def _claim_loop(self) -> None:
        last_purge = last_count = 0.0
        while self._claiming:
            self._wake.clear()
            if time.monotonic() - last_count > _COUNT_QUEUED_EVERY_S:  # others' jobs too: replicas share a store
                last_count = time.monotonic()
                await self._count_queued()
            job = None
            if len(self._running) < self.settings.job_concurrency:
                try:
                    job = await asyncio.to_thread(
                        self.store.claim, worker=self.worker, lease_s=self.settings.job_lease_s
                    )
                    if time.monotonic() - last_purge > _PURGE_EVERY_S:
                        last_purge = time.monotonic()
                        await asyncio.to_thread(self.store.purge_expired)
                except Exception:
                    log.exception("the job store failed; trying again")
            if job is not None and not self._claiming:  # a drain began while the claim was on its way
                await asyncio.to_thread(self.store.release, job.id, worker=self.worker)
                return
            if job is not None:
                running = _Running(job)
                self._running[job.id] = running
                running.task = asyncio.create_task(self._run(running), name=f"job-{job.id}")
                await self._count_queued()
                continue
            try:
                async with asyncio.timeout(_IDLE_POLL_S):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _count_queued(self) -> None:
        """softdimo_jobs_queued from the store: after this process adds or claims a job, and every few seconds."""
        try:
            self.service.metrics.jobs_queued.set(await asyncio.to_thread(self.store.count_all_queued))
        except Exception:
            log.exception("counting the queued jobs failed; trying again")

    # ------------------------------------------------------------ one job
    async def _run(self, running: _Running) -> None:
        job = running.job
        keeper = asyncio.create_task(self._keep_lease(running))
        outcome: tuple[str, dict | None, dict | None] | None = None
        try:
            log.info("job %s (%s) started, attempt %d", job.id, job.endpoint, job.attempts)
            if job.attempts > self.settings.job_max_attempts:  # it took its process down every time it ran
                log.error("job %s: %d processes died running it; failing it", job.id, job.attempts - 1)
                outcome = (FAILED, None, _gave_up(job.attempts - 1))
            while outcome is None:
                try:
                    outcome = (SUCCEEDED, await self._execute(running), None)
                except ServiceError as exc:  # a full queue of synchronous work: a job waits its turn instead
                    if exc.status != 429:
                        raise
                    await asyncio.sleep(float(exc.headers.get("Retry-After", 1)))
        except asyncio.CancelledError:
            outcome = None if running.released or running.lost else (CANCELLED, None, None)
        except ServiceError as exc:
            if exc.status == 503:  # draining, or models not loaded: another process (or the next one) runs it
                running.released = True
            else:
                outcome = (FAILED, None, {"status": exc.status, "detail": exc.detail})
        except Exception as exc:
            log.exception("job %s failed", job.id)
            outcome = (FAILED, None, {"status": 500, "detail": f"{type(exc).__name__}: {exc}"})
        finally:
            keeper.cancel()
            self._running.pop(job.id, None)
            self._wake.set()
        if running.lost:
            log.warning("job %s was taken over by another process; its outcome here is dropped", job.id)
            return
        if running.released:
            await asyncio.shield(asyncio.to_thread(self.store.release, job.id, worker=self.worker))
            log.info("job %s went back to the queue", job.id)
            return
        status, result, error = outcome
        if status != CANCELLED:  # a cancelled job was marked so by DELETE
            stored = await asyncio.shield(
                asyncio.to_thread(
                    self.store.finish,
                    job.id,
                    worker=self.worker,
                    status=status,
                    result=result,
                    error=error,
                    ttl_s=self.settings.job_result_ttl_s,
                )
            )
            if not stored:
                status = CANCELLED if running.cancelled.is_set() else "lost"
        if status in FINISHED:
            self.service.metrics.jobs.labels(job.endpoint, status).inc()
        if job.webhook is not None and status in FINISHED:
            job.status, job.result, job.error = status, result, error
            self.webhooks.send(job.webhook, message_id=job.id, payload=job_response(job).model_dump(mode="json"))

    async def _keep_lease(self, running: _Running) -> None:
        """Renew the claim while the job runs; stop the job if it was cancelled elsewhere or taken over."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                status = await asyncio.to_thread(
                    self.store.renew, running.job.id, worker=self.worker, lease_s=self.settings.job_lease_s
                )
            except Exception:
                log.exception("renewing the lease of job %s failed", running.job.id)
                continue
            if status != RUNNING:
                log.info("job %s is %s elsewhere; stopping it here", running.job.id, status)
                running.lost = status == "lost"
                running.cancel()
                return

    async def _execute(self, running: _Running) -> dict:
        """The job's answer: exactly what its synchronous endpoint answers for the same body."""
        service, job = self.service, running.job
        began = time.perf_counter()
        if job.endpoint == "generate":
            body = GenerateRequest.model_validate(job.body)
            model = service.loaded_model(body.model)
            work = generate_job(service, model, body)
            result = await service.generate(model=model, job=work, lane=BACKGROUND, timeout_s=None)
            images = await encoded(service, GENERATE, result, body.format)
            return generate_response(service, result, images, began).model_dump(mode="json")
        body = RefineRequest.model_validate(job.body)
        model = service.loaded_model(body.model)
        progress = RefineProgress(loop=asyncio.get_running_loop(), queue=asyncio.Queue(), cancelled=running.cancelled)
        work = refine_job(service, model, body, progress)
        reporter = asyncio.create_task(self._report_progress(running, progress, work.settings.steps))
        try:
            result = await service.refine(model=model, job=work, timeout_s=None)
        finally:
            reporter.cancel()
        images = await encoded(service, REFINE, result, body.format)
        return refine_response(service, result, images, began).model_dump(mode="json")

    async def _report_progress(self, running: _Running, progress: RefineProgress, steps: int) -> None:
        """Write the latest TTEO step's rewards to the store, at most every _PROGRESS_EVERY_S and at the last step."""
        written = 0.0
        while True:
            step, seeds, rewards = await progress.queue.get()
            if step < steps and time.monotonic() - written < _PROGRESS_EVERY_S:
                continue
            written = time.monotonic()
            report = {
                "step": step,
                "steps": steps,
                "images": [{"seed": s, "reward": round(r, 6)} for s, r in zip(seeds, rewards)],
            }
            running.job.progress = report
            try:
                await asyncio.to_thread(self.store.set_progress, running.job.id, worker=self.worker, progress=report)
            except Exception:
                log.exception("writing the progress of job %s failed", running.job.id)
