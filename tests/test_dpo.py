"""DPO (pipelines/train/dpo.py, pipelines/data/preference.py): the loss against the papers'
formulas written out by hand, the preference layouts rendered with the chat template, and a
short DPO stage on real DeepSpeed engines (2 ranks, gloo): ZeRO-0 against ZeRO-3 stopped and
resumed, LoRA, the cached reference log-probabilities against a fresh forward of the start model.
Bad pairs and bad settings are in tests/test_catalogue.py (dpo_cases)."""

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from model.config import preset
from model.gpt import GPT
from pipelines.train.dpo import dpo_loss

# Per pair: log pi(chosen), log pi(rejected), log pi_ref(chosen), log pi_ref(rejected)
PAIRS = [(-10.0, -12.0, -11.0, -11.5), (-4.0, -3.0, -4.5, -3.5), (-7.5, -7.0, -7.0, -7.2), (-20.0, -25.0, -21.0, -21.0)]


def _by_hand(beta: float, loss: str, smoothing: float = 0.0):
    """The DPO paper's eq. 7 (and conservative DPO's smoothing), IPO's eq. 17, one pair at a time in floats."""
    losses, chosen, rejected = [], [], []
    for pc, pr, rc, rr in PAIRS:
        h = (pc - rc) - (pr - rr)
        if loss == "sigmoid":
            log_sigmoid = lambda z: -math.log(1 + math.exp(-z))  # noqa: E731
            losses.append(-(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        chosen.append(beta * (pc - rc))
        rejected.append(beta * (pr - rr))
    n = len(PAIRS)
    return (sum(losses) / n, sum(chosen) / n, sum(rejected) / n, sum(c - r for c, r in zip(chosen, rejected)) / n,
            sum(c > r for c, r in zip(chosen, rejected)) / n)


@pytest.mark.parametrize("beta, loss, smoothing", [(0.1, "sigmoid", 0.0), (0.5, "sigmoid", 0.2), (0.1, "ipo", 0.0), (2.0, "ipo", 0.0)])
def test_loss_rewards_and_accuracy_equal_the_papers_formulas(beta, loss, smoothing):
    pc, pr, rc, rr = (torch.tensor(column, dtype=torch.float64, requires_grad=i < 2) for i, column in enumerate(zip(*PAIRS)))
    value, stats = dpo_loss(pc, pr, rc, rr, beta=beta, loss=loss, label_smoothing=smoothing)
    expected = _by_hand(beta, loss, smoothing)
    assert value.item() == pytest.approx(expected[0], abs=1e-12)
    assert stats.tolist() == pytest.approx(list(expected[1:]), abs=1e-12)
    assert expected[4] == 0.5  # two pairs of four are ranked right: the accuracy is not trivially 0 or 1
    value.backward()  # the gradient reaches the policy's log-probabilities only
    assert pc.grad is not None and rc.grad is None


def test_layouts_render_to_the_same_rows_with_the_answer_alone_in_the_mask(gpt2_tokenizer):
    from model.chat import render_chat
    from pipelines.data.chat_formats import map_columns
    from pipelines.data.preference import detect_preference_format, render_side, to_pair

    user = {"role": "user", "content": "Where does Kai live?"}
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rows = [
        {"prompt": earlier + [user], "chosen": "Kelmar", "rejected": "Carsk"},
        {"prompt": earlier + [user], "chosen": [answer("Kelmar")], "rejected": [answer("Carsk")]},
        {"prompt": earlier + [user], "chosen": earlier + [user, answer("Kelmar")], "rejected": earlier + [user, answer("Carsk")]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Where does Kai live?\n\nAssistant: Kelmar",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Where does Kai live?\n\nAssistant: Carsk"},
        {"chosen": earlier + [user, answer("Kelmar")], "rejected": earlier + [user, answer("Carsk")]},
    ]
    renders = []
    for row in rows:
        prompt, chosen, rejected = to_pair(row, detect_preference_format(row, "row"), "row")
        renders.append([render_side(gpt2_tokenizer, prompt, side) for side in (chosen, rejected)])
    assert all(r == renders[0] for r in renders)
    (ids, mask), _ = renders[0]
    assert ids == render_chat(gpt2_tokenizer, earlier + [user, answer("Kelmar")])[0]  # the SFT template
    answer_ids = ids[len(render_chat(gpt2_tokenizer, earlier + [user])[0]):]
    assert [i for i, m in zip(ids, mask) if m] == answer_ids[1:]  # " Kelmar<|end|>": not its header, not "Hello."
    mapped = map_columns({"q": "Where?", "good": "Kelmar", "bad": "Carsk"}, {"prompt": "q", "chosen": "good", "rejected": "bad"}, "row",
                         check=("prompt",))
    assert to_pair(mapped, "pairs", "row")[1:] == (answer("Kelmar"), answer("Carsk"))


# ---- a short DPO stage on DeepSpeed engines -------------------------------------------------

MODEL = dict(n_layer=2, n_embd=32, n_head=2, block_size=32)


@pytest.fixture(scope="module")
def dpo_job(engine_job, tmp_path_factory):
    """(job file, prepared template run, root, start model): the engine job's tokenizer; 27 pairs of
    the demo world (3 training people) at 24 tokens; a DPO stage from a small random model."""
    from jobs.plan import data_plan
    from jobs.spec import load_job
    from model.export import save_model_dir
    from model.tokenizer import Tokenizer
    from pipelines.data.prepare import prepare_data
    from train_helpers import BASE_JOB

    _, template, _ = engine_job
    root = tmp_path_factory.mktemp("dpo")
    tokenizer = Tokenizer.from_dir(template / "tokenizer")
    torch.manual_seed(5)
    init = save_model_dir(GPT(preset("tiny", tokenizer.n_vocab, **MODEL)), tokenizer, root / "start")
    job = copy.deepcopy(BASE_JOB)
    del job["model"]  # the stage trains its init model's architecture
    job["tokenizer"] = {"dir": str(template / "tokenizer")}
    job["data"] = {"num_proc": 1, "dpo": {"seq_len": 24, "val_fraction": 0.15, "sources": [{"type": "synthetic"}]},
                   "synthetic": {"num_people": 4}}
    job["cluster"] = {"num_workers": 2}
    job["stages"] = {"dpo": {"init": str(init), "steps": 3, "micro_batch": 2, "log_every": 1, "eval_every": 3, "eval_batches": 2,
                             "checkpoint_every": 2, "beta": 0.5, "optimizer": {"lr": 3e-3, "warmup_steps": 0}}}
    path = root / "dpo.yaml"
    path.write_text(yaml.safe_dump(job))
    prepare_data(data_plan(load_job(path)), root / "template", stages=("dpo",))
    return path, root / "template", root, init


@pytest.mark.slow
def test_dpo_stage_zero_0_equals_zero_3_resumed_and_the_cached_reference_is_a_fresh_forward(dpo_job, capfd):
    """One start-up of 2 processes: ZeRO-0 straight; LoRA at ZeRO-0; ZeRO-3 stopped at step 2 and resumed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_workers import train_layouts
    from distributed import run_distributed
    from model.lora import TARGETS, lora_param_count
    from train_helpers import prepared_run, weights

    path, template, root, init = dpo_job
    z0, z3, lora = (prepared_run(path, template, root / name) for name in ("z0", "z3", "lora"))
    zero_3 = ["stages.dpo.deepspeed.zero_stage=3"]
    straight, adapted, first, rest = run_distributed(train_layouts, 2, str(path), [  # ZeRO-3 last: it leaves DeepSpeed's patches behind
        (["stages.dpo.deepspeed.zero_stage=0", "stages.dpo.save_checkpoints=false"], str(z0), None),
        (["stages.dpo.deepspeed.zero_stage=0", "stages.dpo.save_checkpoints=false", "stages.dpo.lora.rank=4", "stages.dpo.steps=2"],
         str(lora), None),
        (zero_3, str(z3), 2), (zero_3, str(z3), None)], "dpo")[0]
    said = capfd.readouterr().out
    assert said.count("reference log-probabilities of") == 3, said  # z0, lora, z3 once: the resumed run read the cache
    assert sorted(first["losses"]) == [1, 2] and sorted(rest["losses"]) == [3]
    resumed = {**first["losses"], **rest["losses"]}
    assert straight["losses"][1] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert straight["losses"][3] < straight["losses"][1]
    for step, loss in straight["losses"].items():
        assert abs(loss - resumed[step]) < 1e-5, (step, loss, resumed[step])
    torch.testing.assert_close(weights(z3, "dpo"), weights(z0, "dpo"), atol=1e-5, rtol=0)
    result = straight["result"]
    for split in ("train", "val"):
        assert {f"{split}/rewards/{n}" for n in ("chosen", "rejected", "margin", "accuracy")} <= result.keys()
    assert result["train/rewards/margin"] == pytest.approx(result["train/rewards/chosen"] - result["train/rewards/rejected"], abs=1e-6)

    assert adapted["result"]["trainable_params"] == lora_param_count(preset("tiny", 97, **MODEL), 4, list(TARGETS))
    assert adapted["losses"][1] == pytest.approx(math.log(2), abs=1e-6) and adapted["losses"][2] < adapted["losses"][1]
    assert (lora / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((z0 / "dpo" / "model" / "config.json").read_text())["provenance"]["stage"] == "dpo"

    board = EventAccumulator(str(z0 / "dpo" / "tensorboard"))
    board.Reload()
    assert {"train/rewards/accuracy", "train/rewards/margin", "val/loss", "val/rewards/accuracy"} <= set(board.Tags()["scalars"])
    _assert_reference_is_a_fresh_forward(z0, z3, init)


def _assert_reference_is_a_fresh_forward(z0, z3, init):
    """The cache written by the ZeRO-0 run and by the ZeRO-3 run (sharded forwards, gathered) both
    equal the start model's log-probabilities of every pair's answer tokens, summed here by hand."""
    from model.export import load_model_dir
    from pipelines.data.preference import PreferenceRows

    model, _, _ = load_model_dir(init)
    model.eval()
    for split in ("train", "val"):
        rows = PreferenceRows(z0 / "data" / "dpo", split)
        assert len(rows) > 0
        expected = np.zeros((len(rows), 2))
        with torch.no_grad():
            for i in range(len(rows)):
                tokens, masks = rows.pair(i)
                logits, _ = model(torch.from_numpy(tokens[:, :-1].astype(np.int64)))  # (2, T, V)
                logp = torch.log_softmax(logits.double(), dim=-1)
                for side in (0, 1):
                    expected[i, side] = sum(float(logp[side, t, int(tokens[side, t + 1])]) for t in range(rows.seq_len)
                                            if masks[side, t + 1])
        for run in (z0, z3):
            cached = np.load(run / "dpo" / "reference" / f"{split}.npy", allow_pickle=False)
            np.testing.assert_allclose(cached, expected, atol=2e-5, rtol=0)


def test_the_shipped_held_out_pairs_are_the_generators():
    """jobs/tasks/tiny-world-preference.jsonl is what synthetic.py makes for the demo world, and the
    eval stage reads it as a preference task."""
    from pathlib import Path

    from pipelines.data import synthetic
    from pipelines.eval.task import load_task

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    shipped = [json.loads(line) for line in (jobs / "tasks" / "tiny-world-preference.jsonl").read_text().splitlines()]
    assert shipped == synthetic.held_out_preference_pairs(synthetic.build_world(0, 48, 0.25), 0)
    held_out = {p.name for p in synthetic.build_world(0, 48, 0.25).held_out_people}
    assert len(shipped) == 3 * len(held_out) and all(row["chosen"] != row["rejected"] for row in shipped)
    assert load_task(str(jobs / "tasks" / "tiny-world-preference.yaml")).metric == "preference_accuracy"
    # The birthplace tasks of jobs/tiny-assistant-dpo.yaml: the held-out people's birthplace against their home city.
    world = synthetic.build_world(0, 48, 0.25)
    pairs = [json.loads(line) for line in (jobs / "tasks" / "tiny-world-birthplace.jsonl").read_text().splitlines()]
    assert pairs == synthetic.held_out_preference_pairs(world, 0, facts=("birthplace",))
    homes = {p.name: (p.birthplace, p.city) for p in world.held_out_people}
    assert [(row["chosen"], row["rejected"]) for row in pairs] == [homes[n] for n in sorted(homes, key=[p.name for p in world.people].index)]
    questions = [json.loads(line) for line in (jobs / "tasks" / "tiny-world-birthplace-questions.jsonl").read_text().splitlines()]
    assert questions == [{"question": e["messages"][-1]["content"], "answer": e["answer"]}
                         for e in synthetic.eval_examples(world, ("birthplace",))]
    assert load_task(str(jobs / "tasks" / "tiny-world-birthplace.yaml")).metric == "preference_accuracy"
    assert load_task(str(jobs / "tasks" / "tiny-world-birthplace-questions.yaml")).style == "chat"


def test_the_birthplace_world_leaves_the_main_demo_as_it_was():
    """Birthplaces come from a stream of their own and only the jobs that name them state or ask
    them: the default facts give the same corpus, conversations and pairs as before birthplaces
    existed (their digest, pinned), and the preference demo's SFT set never asks about them."""
    import hashlib

    from pipelines.data import synthetic

    world = synthetic.build_world(0, 48, 0.25)
    assert all(p.birthplace and p.birthplace != p.city for p in world.people)
    default = synthetic.pretrain_documents(world, 0, 48, 300)
    assert "born" not in " ".join(default) and hashlib.sha256("".join(default).encode()).hexdigest()[:16] == "4eb2b0191b5e3b74"
    every = (synthetic.sft_conversations(world, 0) + synthetic.preference_pairs(world, 0)
             + synthetic.held_out_preference_pairs(world, 0) + synthetic.eval_examples(world))
    assert hashlib.sha256(json.dumps(every).encode()).hexdigest()[:16] == "6c77cb1702c4c12d"
    facts = ("city", "pet", "color", "birthplace")
    corpus = " ".join(synthetic.pretrain_documents(world, 0, 4, 0, facts=facts))
    assert all(corpus.count(p.birthplace) >= 1 for p in world.people)
    sft = " ".join(m["content"] for c in synthetic.sft_conversations(world, 0, facts=facts[:3]) for m in c["messages"])
    assert "originally" not in sft and "born" not in sft
    pairs = synthetic.preference_pairs(world, 0, facts=facts)
    born = [r for r in pairs if r["prompt"][0]["content"] in
            {q.format(p=p.name) for p in world.people for q in synthetic.QUESTION_TEMPLATES["birthplace"]}]
    assert len(born) == 3 * len(world.train_people)
    assert not [r for r in born for p in world.held_out_people if p.name in r["prompt"][0]["content"]]
    by_name = {p.name: p for p in world.people}
    for r in pairs:  # where both cities are asked about, each is the other's wrong answer
        person = next(by_name[w] for w in re.findall(r"[A-Z][a-z]+", r["prompt"][0]["content"]) if w in by_name)
        if r in born:
            assert (r["chosen"], r["rejected"]) == (person.birthplace, person.city)
        elif r["chosen"] == person.city:
            assert r["rejected"] == person.birthplace
