"""The same one-step pipeline served by LitServe, a general-purpose model server with dynamic batching: the peer
`softdimo bench serve --peer litserve` measures this server against.

It answers POST /generate with the body the softdimo server takes (model, prompt or class_label, seed; one image)
and the same JSON image list, each image made by the same pipeline call and PNG-encoded the same way, so the two
servers differ only in how they queue, batch and answer.
Run: python -m benchmarks.litserve_peer --model BUNDLE --port P"""

from __future__ import annotations

import argparse
import base64

import litserve as ls
import torch

from softdimo.device import resolve_device
from softdimo.images import encode_image
from softdimo.pipeline import load_pipeline


class OneStepAPI(ls.LitAPI):
    """A one-step bundle behind LitServe: requests decoded to conditioning and a seed, batches through the pipeline."""

    def __init__(self, model_path: str, **batching):
        super().__init__(api_path="/generate", **batching)
        self.model_path = model_path

    def setup(self, device: str) -> None:
        self.pipeline = load_pipeline(self.model_path, device)

    def decode_request(self, request: dict) -> tuple[torch.Tensor, int]:
        condition = self.pipeline.conditioner.request(request.get("prompt"), request.get("class_label"))
        return condition, int(request.get("seed", 0))

    def batch(self, inputs: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat([condition for condition, _ in inputs]), [seed for _, seed in inputs]

    def predict(self, batch: tuple[torch.Tensor, list[int]]) -> list:
        condition, seeds = batch
        return list(self.pipeline.generate(condition, seeds))

    def unbatch(self, images: list) -> list:
        return images

    def encode_response(self, image) -> dict:
        return {"data": [{"b64_json": base64.b64encode(encode_image(image, "png")).decode("ascii")}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a one-step bundle folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0, help="how long a batch waits for company")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    api = OneStepAPI(args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator=device.type, devices=1, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
