"""Generation worker pool throughput (CPU).

A 6-layer, 384-wide model (random weights), 256 prompts of 8-40 tokens, 48 new tokens each,
greedy. Peers measured in this run:
  - model/generate.py called directly in this process, 1 thread (what one worker does);
  - the Ray Data actor pool with 1 worker x 1 thread: the same work, plus Ray Data (overhead);
  - 1 worker x 2 threads against 2 workers x 1 thread: the two cores used by threads or by
    workers (scaling with workers).
A pool's wall time includes starting its actors (each loads torch and the model); that start-up
is measured on its own (a pool given 2 prompts) and reported beside the steady-state ratios.
"""

import time

import torch

from cluster.launch import generate_on_ray
from model.config import GPTConfig
from model.export import save_model_dir
from model.gpt import GPT
from model.tokenizer import Tokenizer
from pipelines.generation.worker import GenerationWorker

NEW, PROMPTS, BATCH = 48, 256, 16


def _rows():
    g = torch.Generator().manual_seed(0)
    return [{"prompt_tokens": torch.randint(0, 4000, (int(n),), generator=g).tolist()}
            for n in torch.randint(8, 41, (PROMPTS,), generator=g)]


def test_generation_worker_pool(ray_cluster, tmp_path, shared_data, record):
    tok = Tokenizer.from_file(shared_data / "tiktoken" / "r50k_base.tiktoken")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=6, n_head=6, n_embd=384))
    model_dir = save_model_dir(model, tok, tmp_path / "m")
    rows = _rows()
    params = {"max_new_tokens": NEW}
    tokens = PROMPTS * NEW

    def direct():
        worker = GenerationWorker(str(model_dir), params, chat=False, batch_size=BATCH, threads=1)
        start = time.perf_counter()
        worker.complete([dict(r) for r in rows])
        return time.perf_counter() - start

    def pool(workers, cpus, subset=None):
        batch = rows if subset is None else rows[:subset]
        start = time.perf_counter()
        out = generate_on_ray(str(model_dir), batch, params, chat=False, workers=workers, cpus_per_worker=cpus, batch_size=BATCH)
        assert len(out) == len(batch)
        return time.perf_counter() - start

    pool(1, 1, subset=2)  # warm Ray Data up once
    start_one, start_two = pool(1, 1, subset=2), pool(2, 1, subset=4)  # mostly actor start-up
    t_direct = min(direct() for _ in range(2))
    t_one = pool(1, 1)
    t_one_two_threads = pool(1, 2)
    t_two = pool(2, 1)
    torch.set_num_threads(2)
    record("generation_workers", tokens_per_s_direct_1_thread=tokens / t_direct, tokens_per_s_ray_1_worker=tokens / t_one,
           ray_vs_direct=t_direct / t_one, ray_vs_direct_without_startup=t_direct / (t_one - start_one),
           pool_startup_s_1_worker=start_one, pool_startup_s_2_workers=start_two,
           tokens_per_s_1_worker_2_threads=tokens / t_one_two_threads, tokens_per_s_2_workers_1_thread=tokens / t_two,
           workers_vs_threads=t_one_two_threads / t_two, scaling_2_vs_1_worker=t_one / t_two,
           scaling_2_vs_1_worker_without_startup=(t_one - start_one) / (t_two - start_two))
    print(f"Ray Data 1 worker vs direct: {t_direct / t_one:.2f}x ({t_direct / (t_one - start_one):.2f}x without the "
          f"{start_one:.1f} s pool start-up); 2 workers vs 1 (1 thread each): {t_one / t_two:.2f}x; "
          f"2 workers x 1 thread vs 1 worker x 2 threads: {t_one_two_threads / t_two:.2f}x")
