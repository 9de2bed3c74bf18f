"""Zero-shot evaluation: local task files, definitions equal to lm-eval's stock ones, the stage."""
from __future__ import annotations

import json
import math

import pytest
import torch

from omniquant.zeroshot import AVERAGED, TASKS, evaluate, sources, task_config

DOCS = 5  # documents compared per task


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _task(manager, cfg):
    return manager.load(cfg)["tasks"][cfg["task"]]


def _stock_config(manager, task: str, root) -> dict:
    """lm-eval's own definition of ``task``, fed our local documents instead of the hub dataset."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(manager.task_index[task].yaml_path)
    cfg.pop("training_split", None)  # only the evaluated split exists locally
    if cfg.get("test_split"):
        cfg.pop("validation_split", None)
    cfg["custom_dataset"] = task_config(task, root)["custom_dataset"]
    return cfg


def _requests(task) -> list[tuple]:
    task.build_all_requests(limit=DOCS, rank=0, world_size=1)
    return [(inst.request_type, inst.arguments, inst.doc_id) for inst in task.instances]


@pytest.mark.parametrize("name", TASKS)
def test_local_definitions_render_the_stock_requests(name, data_root, manager):
    ours, stock = _task(manager, task_config(name, data_root)), _task(manager, _stock_config(manager, name, data_root))
    assert _requests(ours) == _requests(stock)  # same contexts, continuations (targets and choices)
    docs = list(ours.eval_docs)[:DOCS]
    assert [ours.doc_to_target(d) for d in docs] == [stock.doc_to_target(d) for d in docs]
    assert ours.config.output_type == stock.config.output_type
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in stock.config.metric_list]


@pytest.mark.parametrize("name,rows", [("piqa", 1838), ("arc_easy", 2376), ("arc_challenge", 1172), ("boolq", 3270),
                                       ("hellaswag", 10042), ("winogrande", 1267), ("lambada_openai", 5153)])
def test_local_files_give_the_canonical_split_sizes(name, rows, data_root):
    (split, ds), = sources.load(name, data_root).items()
    assert len(ds) == rows


def test_local_documents_have_the_stock_schema(data_root):
    hs = sources.load("hellaswag", data_root)["validation"][0]
    assert hs["activity_label"] == "Roof shingle removal" and hs["ctx_a"] == "A man is sitting on a roof. he"
    assert hs["endings"][int(hs["label"])] == "starts pulling up roofing on a roof."
    boolq = sources.load("boolq", data_root)["validation"][0]
    assert boolq["passage"].startswith("Ethanol fuel -- ") and boolq["label"] == 0
    arc = sources.load("arc_challenge", data_root)["test"][0]
    assert arc["id"] == "Mercury_7175875" and arc["choices"]["label"].index(arc["answerKey"]) == 2
    wino = sources.load("winogrande", data_root)["validation"][0]
    assert wino["answer"] == "2" and wino["option2"] == "Maria"


@pytest.fixture(scope="module")
def tiny_zeroshot(data_root):
    from omniquant.models.tiny import tiny_llama

    model, tokenizer = tiny_llama(num_key_value_heads=2)
    return evaluate(model, tokenizer, TASKS, data_root, limit=3, batch_size=4, metric="acc_norm",
                    device=torch.device("cpu"))


def test_tiny_model_runs_every_local_task(tiny_zeroshot):
    res = tiny_zeroshot
    assert res["zeroshot_skipped"] == {}
    for name in TASKS:
        key = "hellaswag_derived" if name == "hellaswag" else name
        assert res[f"{key}_n"] == 3 and 0 <= res[f"{key}_acc"] <= 1
    for key in ("piqa", "arc_easy", "arc_challenge", "hellaswag_derived"):
        assert 0 <= res[f"{key}_acc_norm"] <= 1
    assert "hellaswag" in res["zeroshot_derived"] and res["lambada_openai_ppl"] > 1
    # the average over the paper's six tasks takes acc_norm where a task has it, else acc
    picked = [res.get(f"{k}_acc_norm", res[f"{k}_acc"]) for k in res["zeroshot_avg_tasks"]]
    assert len(picked) == len(AVERAGED) and math.isclose(res["zeroshot_avg"], sum(picked) / len(picked))


def test_missing_task_file_is_skipped_and_recorded(tmp_path, data_root, capsys):
    from omniquant.models.tiny import tiny_llama

    (tmp_path / "piqa").mkdir()
    for rel in sources.FILES["piqa"]:
        (tmp_path / rel).symlink_to(data_root / rel)
    model, tokenizer = tiny_llama(num_key_value_heads=2)
    res = evaluate(model, tokenizer, ["piqa", "boolq"], tmp_path, limit=2, batch_size=2, metric="acc",
                   device=torch.device("cpu"))
    assert res["piqa_n"] == 2 and "boolq_acc" not in res
    assert res["zeroshot_skipped"] == {"boolq": f"missing {tmp_path / 'boolq/dev.jsonl'}"}
    assert "skipping boolq: missing data file" in capsys.readouterr().out


def test_eval_zeroshot_stage_writes_metrics(make_cfg, data_root, tmp_path):
    from omniquant.stages.eval_zeroshot import eval_zeroshot

    cfg = make_cfg("model=tiny-llama", "quant=fp16", "method=fp", "eval.zeroshot.limit=2", f"data.root={data_root}",
                   "eval.zeroshot.tasks=[winogrande,arc_easy]", f"paths.cache={tmp_path / 'cache'}")
    metrics = eval_zeroshot(cfg)
    saved = json.loads((tmp_path / "metrics/tiny-llama/fp16/fp.zeroshot.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert (saved["model"], saved["setting"], saved["method"]) == ("tiny-llama", "fp16", "fp")
    assert saved["zeroshot_avg"] == pytest.approx((saved["winogrande_acc"] + saved["arc_easy_acc"]) / 2)
    assert list((tmp_path / "cache/lm_eval/tiny-llama/fp16/fp").glob("*_rank0.db"))  # resumable by default


class _Interrupt(Exception):
    pass


def test_interrupted_evaluation_resumes_from_the_request_cache(tmp_path, data_root):
    from omniquant.models.tiny import tiny_llama
    from omniquant.zeroshot import fingerprint

    model, tokenizer = tiny_llama(num_key_value_heads=2)
    run = dict(tasks=["piqa", "winogrande"], root=data_root, limit=4, batch_size=2, metric="acc",
               device=torch.device("cpu"))
    calls = {"n": 0, "stop_after": None}

    def forward_hook(*_):
        calls["n"] += 1
        if calls["stop_after"] is not None and calls["n"] > calls["stop_after"]:
            raise _Interrupt

    model.base_model.register_forward_pre_hook(forward_hook)  # the body: the LM head runs outside the forward
    fresh = evaluate(model, tokenizer, **run)
    batches = calls["n"]
    cache = tmp_path / fingerprint(model, "tiny")

    calls.update(n=0, stop_after=2)
    with pytest.raises(_Interrupt):
        evaluate(model, tokenizer, **run, cache=cache)
    assert json.loads(next(tmp_path.glob("*.seconds.json")).read_text())["complete"] is False

    calls.update(n=0, stop_after=None)
    resumed = evaluate(model, tokenizer, **run, cache=cache)
    assert calls["n"] == batches - 2  # the two batches scored before the interrupt are not redone
    keys = [k for k in fresh if k.endswith(("_acc", "_acc_norm", "_n")) or k == "zeroshot_avg"]
    assert {k: resumed[k] for k in keys} == {k: fresh[k] for k in keys}
    assert resumed["zeroshot_seconds_total"] > resumed["zeroshot_seconds"]  # the interrupted run's time counts

    calls.update(n=0, stop_after=0)  # any forward call now fails: a completed evaluation comes from the cache
    again = evaluate(model, tokenizer, **run, cache=cache)
    assert {k: again[k] for k in keys} == {k: fresh[k] for k in keys}
    assert again["zeroshot_seconds_total"] == resumed["zeroshot_seconds_total"]


@pytest.mark.parametrize("act_bits", [None, 4], ids=["fp", "a4"])
def test_shared_context_scores_equal_stock_hflm(act_bits):
    from lm_eval.models.huggingface import HFLM

    from omniquant.block import attach_act_quant
    from omniquant.models.tiny import tiny_llama
    from omniquant.quantizer import QuantSpec
    from omniquant.zeroshot.shared_prefix import SharedPrefixLM

    model, tokenizer = tiny_llama(num_key_value_heads=2)
    if act_bits:
        attach_act_quant(model, QuantSpec(act_bits))  # per-token activation quantizers see the same rows
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=gen).tolist()

    contexts = [ids(7), ids(7), ids(12), ids(1), ids(5)]
    requests = [(("c0", f"x{i}"), contexts[0], ids(n)) for i, n in enumerate([3, 1, 6, 2])]  # mixed lengths
    requests += [(("c1", f"y{i}"), contexts[1], ids(n)) for i, n in enumerate([4, 2])]  # same context length
    requests += [(("c2", "z0"), contexts[2], ids(5)), (("c2", "z1"), contexts[2], ids(2))]
    requests += [(("c3", f"w{i}"), contexts[3], ids(3)) for i in range(2)]  # one-token context: stock path
    requests += [(("c4", f"v{i}"), contexts[4], ids(1)) for i in range(3)]  # one-token choices
    requests += [(("c5", "lone"), ids(9), ids(4))]
    order = torch.randperm(len(requests), generator=gen).tolist()
    requests = [requests[i] for i in order]
    shared = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu")
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu")
    ours, theirs = shared._loglikelihood_tokens(requests), stock._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
    assert len({lp for lp, _ in ours}) == len(requests)  # distinct requests: nothing scored twice by mistake
