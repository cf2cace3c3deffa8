"""lm-evaluation-harness through ``entrodrop eval``: a local task registered with --include-path,
run on a dense and an attention-pruned tiny model against lm-eval's own ``--model hf`` run,
and every way a request can fail (one line, exit 1, nothing written).

The tests that run lm-eval skip when it is not installed; the project's test environment
installs it (``lm-eval[hf]`` is in the ``test`` extra).
"""

from __future__ import annotations

import builtins
import json
import re
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import pytest
from helpers import tiny_model

from entrodrop_fast.cli import main
from entrodrop_fast.evaluate import lm_eval as L

needs_lm_eval = pytest.mark.skipif(
    find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed (pip install 'entrodrop_fast[eval]'; the test "
    "extra installs it)",
)

TASK = "tiny_mc"
TRAIN = [
    {"q": "what colour is the sky", "choices": ["blue", "red", "green"], "label": 0},
    {"q": "what colour is the grass", "choices": ["blue", "red", "green"], "label": 2},
]
TEST = [
    {"q": "the cat sat on a", "choices": ["mat", "dog", "sky"], "label": 0},
    {"q": "what colour is the blood", "choices": ["red", "blue", "green", "mat"], "label": 0},
    {"q": "the dog ran to the", "choices": ["cat", "sky"], "label": 0},
    {"q": "a red sky at night", "choices": ["is", "dog"], "label": 1},
    {"q": "what sat on the mat", "choices": ["the cat", "the blue sky", "green"], "label": 0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(name: str, data: dict[str, Path], **extra) -> str:
    files = "".join(f"    {split}: {p}\n" for split, p in data.items())
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        files.rstrip("\n"),
        "training_split: train" if "train" in data else "",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "Question: {{q}} Answer:"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(line for line in lines if line) + "\n"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """One directory of task YAMLs (registered once per process: lm-eval's index takes seconds)."""
    d = tmp_path_factory.mktemp("tasks")
    train, test = write_jsonl(d / "train.jsonl", TRAIN), write_jsonl(d / "test.jsonl", TEST)
    (d / "tiny_mc.yaml").write_text(task_yaml(TASK, {"train": train, "test": test}))
    (d / "missing_data.yaml").write_text(
        task_yaml("tiny_missing_data", {"test": d / "nowhere.jsonl"})
    )
    (d / "bad_type.yaml").write_text(
        task_yaml("tiny_bad_type", {"test": test}).replace("multiple_choice", "multiple_guess")
    )
    (d / "hub.yaml").write_text(
        task_yaml("tiny_hub", {"test": test}).replace(
            "dataset_path: json", "dataset_path: someone/some_dataset"
        )
    )
    (d / "broken.yaml").write_text(
        "task: tiny_broken\n  doc_to_text: [\n"
    )  # not YAML: lm-eval skips it
    return d


def words_of(rows: list[dict]) -> list[str]:
    text = " ".join(r["q"] + " " + " ".join(r["choices"]) for r in rows)
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text + " Question: Answer:")))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama with a word-level tokenizer (dense), and its export without the
    attention of layers 1 and 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from entrodrop_fast import export_pruned

    root = tmp_path_factory.mktemp("models")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words_of(TRAIN + TEST)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # the table's Llama (norms perturbed: a random model whose choices differ clearly), with
    # the word vocabulary, room for the prompts, and no padding row (id 0 is <unk>)
    model = tiny_model(
        "llama", layers=4, vocab_size=len(vocab), max_position_embeddings=256, pad_token_id=None
    )
    dense = root / "dense"
    model.save_pretrained(dense)
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(dense)
    pruned = root / "attn_pruned"
    export_pruned(dense, pruned, {"attn": [1, 2]})
    return {"dense": dense, "pruned": pruned}


# ---------------------------------------------------------------- a real run against lm-eval's own


@pytest.fixture(scope="module")
def lm_eval_tasks(task_dir):
    """lm-eval's own task index of ``task_dir`` (what ``--include_path`` builds), once per
    module."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir))


def lm_eval_own(model_dir: Path, task_manager, *, remote_code: bool, **kw) -> dict:
    """``lm-eval run --model hf --model_args pretrained=DIR --include_path TASKS``, in-process."""
    import lm_eval

    args = f"pretrained={model_dir},dtype=float32" + (
        ",trust_remote_code=True" if remote_code else ""
    )
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=[TASK],
        task_manager=task_manager,
        device="cpu",
        batch_size=3,
        log_samples=True,
        **kw,
    )


def per_choice(out: dict) -> list[list[float]]:
    """Each document's log-likelihood of each choice, in document order."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples]


def metrics(out: dict) -> dict:
    res = out["results"][TASK]
    return {
        k: res[k] for k in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none")
    }


@pytest.mark.slow
@needs_lm_eval
def test_local_task_on_dense_and_attention_pruned_models_equals_lm_eval_own_run(
    model_dirs, task_dir, lm_eval_tasks, tmp_path, capsys
):
    from entrodrop_fast.models import load_model

    lls = {}
    for kind, d in model_dirs.items():
        ref = lm_eval_own(d, lm_eval_tasks, remote_code=kind == "pruned")
        lm = load_model(str(d))
        if kind == "pruned":
            assert (
                type(lm.model).__name__.startswith("EntrodropPruned")
                and lm.model.config.num_hidden_layers == 4
            )
        ours = L.evaluate_tasks(
            lm.model, lm.tokenizer, [TASK], include_path=task_dir, batch_size=3, log_samples=True
        )
        assert metrics(ours) == metrics(ref), kind
        assert per_choice(ours) == per_choice(ref), (
            f"{kind}: per-choice log-likelihoods differ from lm-eval's own run"
        )
        assert [len(c) for c in per_choice(ours)] == [len(r["choices"]) for r in TEST]
        lls[kind] = per_choice(ours)

        # the command line: the same numbers, each metric under its own name
        out = tmp_path / f"{kind}.json"
        rc = main(
            [
                "eval",
                str(d),
                "--tasks",
                TASK,
                "--include-path",
                str(task_dir),
                "--lm-eval-batch-size",
                "3",
                "--json",
                str(out),
                "--no-speed",
                "--seq-len",
                "8",
                "--windows",
                "2",
                "--items",
                "4",
            ]
        )
        printed = capsys.readouterr().out
        assert rc == 0
        row = json.loads(out.read_text())["lm_eval"]["tasks"][0]
        assert row["task"] == TASK and row["items"] == len(TEST) and row["num_fewshot"] == 0
        assert row["metrics"] == {
            "acc": ref["results"][TASK]["acc,none"],
            "acc_norm": ref["results"][TASK]["acc_norm,none"],
        }
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(TASK))
        assert (
            f"acc {row['metrics']['acc']:.4g} (stderr" in line
            and f"acc_norm {row['metrics']['acc_norm']:.4g} (stderr" in line
        )
        assert "accuracy" not in line
    assert lls["dense"] != lls["pruned"], (
        "dropping attention changed nothing: the pruned model was not the one evaluated"
    )


@pytest.mark.slow
@needs_lm_eval
def test_limit_and_num_fewshot_match_lm_eval(model_dirs, task_dir, lm_eval_tasks):
    from entrodrop_fast.models import load_model

    ref = lm_eval_own(model_dirs["dense"], lm_eval_tasks, remote_code=False, limit=2, num_fewshot=1)
    lm = load_model(str(model_dirs["dense"]))
    ours = L.evaluate_tasks(
        lm.model,
        lm.tokenizer,
        [TASK],
        include_path=task_dir,
        batch_size=3,
        limit=2,
        num_fewshot=1,
        log_samples=True,
    )
    assert len(ours["samples"][TASK]) == 2 and ours["n-shot"][TASK] == 1
    assert (
        "Question: what colour is the" in ours["samples"][TASK][0]["arguments"][0][0]
    )  # a training example in the prompt
    assert metrics(ours) == metrics(ref) and per_choice(ours) == per_choice(ref)
    rows = L.result_rows(ours)
    assert (
        rows[0]["items"] == 2 and rows[0]["documents"] == len(TEST) and rows[0]["num_fewshot"] == 1
    )
    assert "2 of 5 items, 1-shot" in L.format_row(rows[0])


# ------------------------------------------------------------- failures: what was wrong, what to do


@needs_lm_eval
def test_unknown_task_lists_the_registered_ones_and_how_to_register(task_dir):
    with pytest.raises(L.TaskNotFound) as e:
        L.prepare_tasks(["tiny_mcq"], include_path=task_dir)
    msg = str(e.value)
    assert "'tiny_mcq' not found" in msg and "did you mean tiny_mc" in msg
    assert (
        "registered from the include path: tiny_bad_type, tiny_hub, tiny_mc, tiny_missing_data"
        in msg
    )
    assert "broken.yaml" in msg  # the YAML that lm-eval skipped, and why
    assert "include_path DIR" in msg and "Hugging Face hub" not in msg  # as Python names it
    with pytest.raises(L.TaskNotFound, match=r"nowhere/task\.yaml: no such file"):
        L.prepare_tasks([str(task_dir / "nowhere" / "task.yaml")], include_path=task_dir)


@needs_lm_eval
def test_a_task_yaml_path_and_a_registered_name_load_the_same_task(task_dir):
    by_path = L.prepare_tasks(
        [str(task_dir / "tiny_mc.yaml")], include_path=task_dir
    )  # the path is not a registered name
    by_name = L.prepare_tasks([TASK], include_path=[task_dir])
    assert [t.task_name for t in by_path.items] == [t.task_name for t in by_name.items] == [TASK]
    assert by_name.include_path == [str(task_dir.resolve())]
    assert len(list(by_path.items[0].test_docs())) == len(TEST)


@needs_lm_eval
def test_missing_local_data_file_is_not_blamed_on_the_hub(task_dir):
    with pytest.raises(L.TaskDataError) as e:
        L.prepare_tasks(["tiny_missing_data"], include_path=task_dir)
    msg = str(e.value)
    assert (
        "a data file is missing" in msg
        and str(task_dir / "nowhere.jsonl") in msg
        and "missing_data.yaml" in msg
    )
    assert "Hugging Face hub" not in msg


@needs_lm_eval
def test_invalid_task_configs_yaml_and_dict(task_dir):
    with pytest.raises(
        L.TaskConfigError,
        match=r"'tiny_bad_type' \(.*bad_type\.yaml\): the task config is invalid .*multiple_guess",
    ):
        L.prepare_tasks(["tiny_bad_type"], include_path=task_dir)
    # config dicts (the Python API takes them) are named in the message, never crash it
    cfg = {
        "task": "dict_task",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task_dir / "test.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_guess",
        "doc_to_text": "{{q}}",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
    }
    with pytest.raises(
        L.TaskConfigError, match=r"'dict_task': the task config is invalid .*multiple_guess"
    ):
        L.prepare_tasks([cfg], include_path=task_dir)
    with pytest.raises(
        L.TaskConfigError,
        match=r"a config dict without a 'task' or 'group' name \(keys: foo\).*needs a 'task' key",
    ):
        L.prepare_tasks([{"foo": 1}], include_path=task_dir)


@needs_lm_eval
def test_hub_dataset_unreachable(task_dir, monkeypatch):
    import datasets

    def offline(*a, **k):
        try:
            raise FileNotFoundError("Dataset someone/some_dataset is not cached in None")
        except FileNotFoundError:
            raise ConnectionError(
                "Couldn't reach 'someone/some_dataset' on the Hub (LocalEntryNotFoundError)"
            ) from None

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(L.HubUnreachable) as e:
        L.prepare_tasks(["tiny_hub"], include_path=task_dir)
    msg = str(e.value)
    assert (
        "needs the dataset 'someone/some_dataset' from the Hugging Face hub, which could not be "
        "reached" in msg
    )
    assert "HF_HUB_OFFLINE=1" in msg and "include_path DIR" in msg


def test_classify_offline_and_missing_hub_dataset():
    try:
        try:
            raise FileNotFoundError("Dataset org/x is not cached")
        except FileNotFoundError:
            raise ConnectionError(
                "Couldn't reach 'org/x' on the Hub (OfflineModeIsEnabled)"
            ) from None
    except ConnectionError as exc:
        err = L.classify_failure(exc, {"task": "t", "dataset_path": "org/x"})
    assert isinstance(
        err, L.HubUnreachable
    ) and "not cached here, and HF_HUB_OFFLINE forbids fetching it" in str(err)
    gone = type("DatasetNotFoundError", (FileNotFoundError,), {})(
        "Dataset 'org/y' doesn't exist on the Hub"
    )
    err = L.classify_failure(gone, {"task": "t", "dataset_path": "org/y"})
    assert (
        isinstance(err, L.TaskDataError)
        and "'org/y' was not found" in str(err)
        and "dataset_path" in str(err)
    )
    err = L.classify_failure(KeyError("label"), ["a", {"task": "b"}], stage="run")
    assert isinstance(err, L.TaskRunError)


def fake_imports(monkeypatch, missing: str):
    """Import lm_eval as a stub; importing its Hugging Face model fails for want of ``missing``."""
    real = builtins.__import__
    stub = types.ModuleType("lm_eval")
    stub.__version__ = "0.4.13"

    def fake(name, *a, **k):
        if name == "lm_eval":
            if missing == "lm_eval":
                raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")
            return stub
        if name.startswith("lm_eval."):
            raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_hf_extra_names_the_module_and_the_command(monkeypatch, capsys, tmp_path):
    fake_imports(monkeypatch, "accelerate")
    with pytest.raises(L.LmEvalMissing) as e:
        L.import_lm_eval()
    msg = str(e.value)
    assert (
        "the module 'accelerate' is missing" in msg
        and "lm-eval[hf]" in msg
        and "pip install 'entrodrop_fast[eval]'" in msg
    )
    assert "not installed" not in msg
    # the command checks it before it loads the model (which does not exist here)
    rc = main(["eval", str(tmp_path / "no_model"), "--tasks", "piqa", "--no-speed"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(
        "entrodrop eval: error: lm-evaluation-harness is installed without its Hugging Face extra"
    )
    assert "'accelerate'" in err and len(err.strip().splitlines()) == 1


def test_missing_lm_eval(monkeypatch):
    fake_imports(monkeypatch, "lm_eval")
    with pytest.raises(
        L.LmEvalMissing,
        match=r"lm-evaluation-harness is not installed: pip install 'entrodrop_fast\[eval\]'",
    ):
        L.import_lm_eval()


def test_too_old_lm_eval_is_refused(monkeypatch):
    stub = types.ModuleType("lm_eval")
    stub.__version__ = "0.4.5"
    models_pkg, hf = (
        types.ModuleType("lm_eval.models"),
        types.ModuleType("lm_eval.models.huggingface"),
    )
    hf.HFLM = object
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = type("TaskManager", (), {})
    for name, mod in {
        "lm_eval": stub,
        "lm_eval.models": models_pkg,
        "lm_eval.models.huggingface": hf,
        "lm_eval.tasks": tasks,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    with pytest.raises(
        L.LmEvalMissing,
        match=r"lm-evaluation-harness 0\.4\.5 is installed; entrodrop needs 0\.4\.13 or later",
    ):
        L.import_lm_eval()


@pytest.mark.parametrize(
    "argv, rc, message",
    [
        (["--limit", "0", "--tasks", "t"], 2, "--limit: must be a positive integer, got '0'"),
        (
            ["--num-fewshot", "-1", "--tasks", "t"],
            2,
            "--num-fewshot: must be an integer >= 0, got '-1'",
        ),
        (
            ["--lm-eval-batch-size", "0", "--tasks", "t"],
            2,
            "--lm-eval-batch-size: must be a positive integer, got '0'",
        ),
        (
            ["--limit", "5", "--num-fewshot", "2"],
            1,
            "entrodrop eval: error: --limit, --num-fewshot only apply to lm-evaluation-harness "
            "tasks: give them with --tasks",
        ),
        (
            ["--tasks", "t", "--include-path", "{tmp}/nowhere"],
            1,
            "entrodrop eval: error: --include-path {tmp}/nowhere: no such directory",
        ),
        (
            ["--tasks", "t", "--include-path", "{tmp}/task.yaml"],
            1,
            "entrodrop eval: error: --include-path {tmp}/task.yaml: not a directory",
        ),
    ],
)
def test_lm_eval_flags_are_checked_up_front(argv, rc, message, tmp_path, capsys):
    (tmp_path / "task.yaml").write_text("task: t\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if rc == 2:
        with pytest.raises(SystemExit) as e:
            main(["eval", "--no-speed", *argv])
        assert e.value.code == 2
    else:
        assert main(["eval", str(tmp_path / "no_model"), "--no-speed", *argv]) == 1
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@needs_lm_eval
def test_failing_tasks_exit_1_and_write_nothing(
    model_dirs, task_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "eval.json"
    common = [
        "--include-path",
        str(task_dir),
        "--json",
        str(out),
        "--no-speed",
        "--seq-len",
        "8",
        "--windows",
        "2",
        "--items",
        "4",
    ]
    # a task that is not registered: refused before the model loads (there is none at that path)
    assert main(["eval", str(tmp_path / "no_model"), "--tasks", f"{TASK},tiny_nope", *common]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("entrodrop eval: error: lm-eval task 'tiny_nope' not found")
        and not out.exists()
    )
    assert "passing --include-path DIR" in err  # the command names its flag
    # a task that fails while it runs on the model
    from lm_eval.models.huggingface import HFLM

    def broken(self, requests, **kw):
        raise RuntimeError("no log-likelihoods today")

    monkeypatch.setattr(HFLM, "loglikelihood", broken)
    assert main(["eval", str(model_dirs["dense"]), "--tasks", TASK, *common]) == 1
    err = capsys.readouterr().err
    assert (
        "entrodrop eval: error: lm-eval failed while evaluating tiny_mc (RuntimeError: no "
        "log-likelihoods today)" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".*entrodrop-tmp*"))
