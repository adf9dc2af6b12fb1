"""Runtime options give the images the plain path gives: bf16 within its rounding, compiled buckets and host copies
exactly. On CPU each runs (pinning aside); on CUDA, pinned memory and CUDA graphs are checked too."""

import numpy as np
import pytest
import torch

from softdimo import runtime as rt
from softdimo.warmup import example_inputs
from softdimo.pipeline import load_pipeline
from softdimo.seeding import ImageNoise

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def pipelines(tiny_bundles):
    return {name: load_pipeline(tiny_bundles[name], "cpu") for name in ("one-step", "text")}


def _images(pipeline, settings: rt.RuntimeSettings, seeds=SEEDS, max_batch_size: int = 4) -> np.ndarray:
    condition, _ = example_inputs(pipeline, len(seeds))
    return rt.Runtime(settings, max_batch_size=max_batch_size).generate(pipeline, condition, seeds)


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert (
        rt.bucket_sizes(16) == (1, 2, 4, 8, 16)
        and rt.bucket_sizes(12) == (1, 2, 4, 8, 12)
        and rt.bucket_sizes(1) == (1,)
    )
    compiled = rt.Runtime(rt.RuntimeSettings(compile=True), max_batch_size=12)
    assert [compiled.bucket(n) for n in (1, 3, 5, 9, 12, 20)] == [1, 4, 8, 12, 12, 20]
    assert rt.Runtime(rt.RuntimeSettings(), max_batch_size=12).bucket(3) == 3  # no padding without compiling
    with pytest.raises(ValueError, match="precision"):
        rt.RuntimeSettings(precision="fp16")


@pytest.mark.slow  # inductor compiles the tiny network: seconds, tens of them on a cold cache
@pytest.mark.parametrize("name", ["one-step", "text"])
def test_compiled_buckets_give_the_same_images(pipelines, name):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pipeline = pipelines[name]
    plain = _images(pipeline, rt.RuntimeSettings())
    compiled = _images(pipeline, rt.RuntimeSettings(compile=True))  # 3 images padded to a bucket of 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the network did run compiled
    assert compiled.shape == plain.shape == (3, 64, 64, 3) and (compiled == plain).all()
    assert "forward_embeddings" not in vars(
        pipeline.generator.model if name == "one-step" else pipeline.model
    )  # eager again


def test_host_copies_through_the_staging_path_change_nothing(pipelines, monkeypatch):
    copies = []
    staged = rt.Runtime.to_host
    monkeypatch.setattr(rt.Runtime, "to_host", staticmethod(lambda t: copies.append(t.shape) or staged(t)))
    pipeline = pipelines["one-step"]
    assert (_images(pipeline, rt.RuntimeSettings(pin_memory=True)) == _images(pipeline, rt.RuntimeSettings())).all()
    assert copies == [torch.Size([3, 64, 64, 3])]  # once, for the pinned run only


def test_bf16_logits_stay_within_bf16_rounding_and_images_come_out(pipelines):
    pipeline = pipelines["one-step"]
    condition, _ = example_inputs(pipeline, 3)
    generator = pipeline.generator
    embeddings = generator.initial_embeddings(ImageNoise(SEEDS), condition)
    with torch.inference_mode():
        exact = generator.logits(embeddings, condition)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = generator.logits(embeddings, condition)
    assert rounded.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: each layer's rounding is ~0.4%; through the tiny network it stays within 5%.
    assert (rounded.float() - exact).abs().max() <= 0.05 * exact.abs().max()
    images = _images(pipeline, rt.RuntimeSettings(precision="bf16"))
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    assert (images == _images(pipeline, rt.RuntimeSettings(precision="bf16"))).all()  # still a function of the seed


def test_int8_weights_run_generate_only_and_stay_close(pipelines):
    pipeline = pipelines["one-step"]
    generator = pipeline.generator
    condition, _ = example_inputs(pipeline, 3)
    embeddings = generator.initial_embeddings(ImageNoise(SEEDS), condition)
    run = rt.Runtime(rt.RuntimeSettings(precision="int8"))
    with torch.inference_mode():
        exact = generator.logits(embeddings, condition)
        with run._swapped_network(pipeline):
            quantised = generator.logits(embeddings, condition)
    assert not torch.equal(quantised, exact)  # the int8 network did run
    # int8 weights and per-batch activations: ~1% rounding per layer, within 10% of the logits' range here
    assert (quantised - exact).abs().max() <= 0.1 * exact.abs().max()
    assert "forward_embeddings" not in vars(generator.model)  # the fp32 network answers again, for TTEO
    images = _images(pipeline, rt.RuntimeSettings(precision="int8"))
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    assert (images == _images(pipeline, rt.RuntimeSettings(precision="int8"))).all()  # still a function of the seed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_pinned_copies_and_cuda_graphs_give_the_same_images(tiny_bundles):
    pipeline = load_pipeline(tiny_bundles["one-step"], "cuda")
    plain = _images(pipeline, rt.RuntimeSettings())
    pinned = rt.Runtime.to_host(torch.zeros(2, 3, device="cuda"))
    assert pinned.is_pinned()
    assert (_images(pipeline, rt.RuntimeSettings(pin_memory=True)) == plain).all()
    assert (_images(pipeline, rt.RuntimeSettings(compile=True, pin_memory=True)) == plain).all()
