import numpy as np
import torch

from softdimo.train.batches import BatchesAhead, WorldBatch, worker_count


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True))


def test_batches_drawn_by_workers_are_those_of_their_steps():
    draw = WorldBatch(seed=3, size=5, kinds=("pair", "count"), placement="grid", noise_seeds=True)
    batches = BatchesAhead(draw, stop=12, device=torch.device("cpu"), workers=2, ahead=2)
    for step in [4, 5, 6, 7, 2, 3]:  # a resumed run starts anywhere; out of order starts the workers again
        assert _same(batches(step), draw(step))
    assert not _same(draw(4), draw(5))


def test_world_batch_is_a_function_of_its_step():
    draw = WorldBatch(seed=0, size=3, kinds=("single",), placement="grid")
    images, prompts, labels = draw(7)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8 and len(prompts) == 3
    assert _same(draw(7), (images, prompts, labels))


def test_batches_are_drawn_in_process_on_a_cpu_and_beside_a_gpu_by_all_but_two_cores_up_to_eight(monkeypatch):
    for cores, workers in ((64, 8), (10, 8), (6, 4), (3, 1), (2, 1), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda: cores)
        assert worker_count(torch.device("cpu")) == 0
        assert worker_count(torch.device("cuda")) == workers, cores
