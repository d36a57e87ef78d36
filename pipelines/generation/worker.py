"""The generation worker: what every actor of a Ray Data generation pool runs, and what
`relaygpt generate` runs in-process. Loads a model directory once, answers batches of rows.
Nothing here imports Ray."""

from __future__ import annotations

import json


DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str = "auto", *, cuda_available: bool | None = None, bf16_supported: bool | None = None):
    """(device, dtype) a generation worker loads its model with: `auto` is the GPU this process
    was given (Ray sets CUDA_VISIBLE_DEVICES for an actor that reserved one), in bf16 where it
    has bf16, else the CPU in fp32. Asking for `cuda` where there is none is an error."""
    import torch

    from model.errors import RelayError

    if requested not in DEVICES:
        raise RelayError(f"--device: must be one of {', '.join(DEVICES)}, got {requested!r}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not cuda:
        raise RelayError("--device cuda: this process sees no CUDA device (use --device cpu, or reserve a GPU for the workers)")
    if requested == "cpu" or not cuda:
        return "cpu", torch.float32
    bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return "cuda", torch.bfloat16 if bf16 else torch.float32


WORK = ("complete", "score_choices", "score_texts", "score_rolling")


class GenerationWorker:
    """Loads a model directory once, on its device (pick_device); answers batches of rows with
    one kind of work, named when it is built (a Ray Data actor runs one kind for its pool):
    `complete` (generation), `score_choices` (multiple choice), `score_texts` (bits per byte) or
    `score_rolling` (a text's whole log-likelihood, for lm-evaluation-harness)."""

    def __init__(self, model_dir: str, params: dict, chat: bool, batch_size: int = 16, threads: int | None = None,
                 device: str = "auto", work: str = "complete") -> None:
        import torch

        from model.errors import RelayError
        from model.export import load_model_dir
        from model.generate import SamplingParams, prepare_for_inference

        if work not in WORK:
            raise RelayError(f"generation worker: work must be one of {', '.join(WORK)}, got {work!r}")
        if threads:
            torch.set_num_threads(threads)
        self.device, dtype = pick_device(device)
        self.model, self.tokenizer, _ = load_model_dir(model_dir, device=self.device, dtype=dtype)
        if self.device == "cpu":
            prepare_for_inference(self.model)  # the fastest CPU matrix kernel of this machine, measured
        self.model.eval()
        self.params = SamplingParams(**params)
        self.chat, self.batch_size, self.work = chat, batch_size, work

    def complete(self, rows: list[dict]) -> list[dict]:
        """Completions of prompt rows (pipelines/generation/rows.py)."""
        from pipelines.generation.rows import complete_rows

        return complete_rows(self.model, self.tokenizer, rows, self.params, chat=self.chat, batch_size=self.batch_size)

    def score_choices(self, rows: list[dict]) -> list[dict]:
        """Rows of {"context", "continuations"} (multiple choice): every continuation's log-likelihood."""
        from pipelines.generation.rows import score_rows

        return score_rows(self.model, self.tokenizer, rows, batch_size=self.batch_size)

    def score_texts(self, rows: list[dict]) -> list[dict]:
        """Rows of {"score_text"}: its nats and bytes."""
        from pipelines.generation.rows import score_texts

        return score_texts(self.model, self.tokenizer, rows)

    def score_rolling(self, rows: list[dict]) -> list[dict]:
        """Rows of {"rolling_text"}: the whole text's log-likelihood in the harness's rolling windows."""
        from pipelines.generation.rows import score_rolling

        return score_rolling(self.model, self.tokenizer, rows, batch_size=self.batch_size)

    def run(self, rows: list[dict]) -> list[dict]:
        """`rows` through the work this worker was built for."""
        return getattr(self, self.work)(rows)

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch of {"_index", "_row" (JSON)} -> {"_index", "_result" (JSON)}."""
        indices = [int(i) for i in _plain(batch["_index"])]
        rows = [json.loads(r) for r in _plain(batch["_row"])]
        done = self.run(rows)
        return {"_index": indices, "_result": [json.dumps(d, ensure_ascii=False) for d in done]}


def _plain(value):
    """numpy scalars / arrays from Ray Data back to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value

