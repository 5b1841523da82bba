"""Rewards: loading functions, the TRL calling convention, validation of scores, learned reward models."""

from __future__ import annotations

import math
import sys
import uuid

import numpy as np
import pytest
import torch

from reinforce_lm import toy
from reinforce_lm.errors import RewardError
from reinforce_lm.files import write_jsonl
from reinforce_lm.rewards import RewardModel, RewardSet, build_rewards, load_reward_function

PROMPTS = ["a?", "b?", "c?"]
COMPLETIONS = ["aaa", "ab", "xyz"]


def write_reward_file(tmp_path, body: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_load_from_file_and_from_module(tmp_path):
    path = write_reward_file(
        tmp_path, "def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    fn = load_reward_function(f"{path}:length")
    assert fn(PROMPTS, COMPLETIONS) == [3, 2, 3]
    assert load_reward_function("reinforce_lm.toy:letter_reward") is toy.letter_reward
    # Two files with the same name load as two different modules.
    other = tmp_path / "sub"
    other.mkdir()
    path2 = write_reward_file(
        other, "def length(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    assert load_reward_function(f"{path2}:length")(PROMPTS, COMPLETIONS) == [0.0] * 3
    assert load_reward_function(f"{path}:length")(PROMPTS, COMPLETIONS) == [3, 2, 3]


def test_reward_file_imports_modules_next_to_it(tmp_path, monkeypatch):
    """As `python my_rewards.py` would: a helper next to the file imports, at load time and lazily."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    eager, lazy = (f"helper_{uuid.uuid4().hex[:8]}" for _ in range(2))  # sys.modules outlives the test
    (tmp_path / f"{eager}.py").write_text("def double(c):\n    return 2 * len(c)\n")
    (tmp_path / f"{lazy}.py").write_text("def one(c):\n    return 1\n")
    path = write_reward_file(
        tmp_path,
        f"from {eager} import double\n\ndef score(prompts, completions, **kw):\n"
        f"    from {lazy} import one\n    return [double(c) + one(c) for c in completions]\n",
    )
    try:
        fn = load_reward_function(f"{path}:score")
        assert fn(PROMPTS, COMPLETIONS) == [7, 5, 7]
    finally:
        sys.modules.pop(eager, None)
        sys.modules.pop(lazy, None)
    assert sys.path[0] != str(tmp_path)  # not left ahead of installed packages


def test_load_errors(tmp_path):
    good = write_reward_file(tmp_path, "X = 3\ndef score_len(prompts, completions):\n    return []\n")
    broken = write_reward_file(tmp_path, "import no_such_module_xyz\n", name="broken.py")
    cases = [
        ("my_rewards.py", r"expected FILE\.py:FUNCTION"),
        (f"{tmp_path}/missing.py:f", r"missing\.py not found"),
        (
            f"{broken}:f",
            r"loading .*broken\.py failed: ModuleNotFoundError: No module named 'no_such_module_xyz'",
        ),
        ("no_such_module_xyz:f", r"importing no_such_module_xyz failed: ModuleNotFoundError"),
        (
            f"{good}:score_length",
            r"has no 'score_length'; its functions: \['score_len'\]; did you mean 'score_len'",
        ),
        (f"{good}:X", r"'X' is a int, not a function"),
        ("reinforce_lm.toy:ALPHABET", r"'ALPHABET' is a str, not a function"),
    ]
    for spec, match in cases:
        with pytest.raises(RewardError, match=match):
            load_reward_function(spec)


def test_a_module_in_the_working_directory_loads_without_python_m(tmp_path, monkeypatch):
    """`--reward my_rewards_cwd:score` works from the `reinforce-lm` script (no working directory on
    sys.path) as under `python -m reinforce_lm`; appended to sys.path, not ahead of packages."""
    write_reward_file(
        tmp_path, "def score(prompts, completions):\n    return [1.0]\n", name="my_rewards_cwd.py"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        fn = load_reward_function("my_rewards_cwd:score")
        assert fn([], []) == [1.0] and sys.path[-1] == str(tmp_path)
    finally:
        sys.modules.pop("my_rewards_cwd", None)


def test_trl_convention_columns_aligned_and_weighted_sum():
    seen = {}

    def record(prompts, completions, completion_ids, letter, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, letter=letter, **kwargs)
        return [1.0, 2.0, 3.0]

    def const(completions, **kwargs):
        return [0.5] * len(completions)

    rs = RewardSet([("record", record, 2.0), ("const", const, -1.0)])
    ids = [[1], [2, 3], [4]]
    total, raw = rs(
        PROMPTS, COMPLETIONS, completion_ids=ids, columns={"letter": ["a", "b", "c"], "n": [1, 2, 3]}
    )
    assert seen == {
        "prompts": PROMPTS,
        "completions": COMPLETIONS,
        "ids": ids,
        "letter": ["a", "b", "c"],
        "n": [1, 2, 3],
    }
    assert total.dtype == torch.float32 and total.tolist() == [1.5, 3.5, 5.5]
    assert raw["record"].tolist() == [1.0, 2.0, 3.0] and raw["const"].tolist() == [0.5] * 3
    assert rs.names == ["record", "const"]


def test_signature_filtering():
    def narrow(completions, letter):  # no **kwargs: gets only what it names
        return [float(c.count(x)) for c, x in zip(completions, letter, strict=True)]

    def optional(prompts, completions, missing_col=None):
        assert missing_col is None
        return [1.0] * len(prompts)

    rs = RewardSet([("narrow", narrow, 1.0), ("optional", optional, 1.0)])
    total, raw = rs(PROMPTS, COMPLETIONS, columns={"letter": ["a", "b", "c"], "other": [0, 0, 0]})
    assert raw["narrow"].tolist() == [3.0, 1.0, 0.0] and total.tolist() == [4.0, 2.0, 1.0]

    def needs(prompts, completions, answer):
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward 'needs' requires \['answer'\].*columns \['letter'\]"):
        RewardSet([("needs", needs, 1.0)])(PROMPTS, COMPLETIONS, columns={"letter": ["a", "b", "c"]})
    with pytest.raises(RewardError, match=r"reward 'needs' requires \['answer'\]"):
        RewardSet([("needs", needs, 1.0)]).check(["letter"])

    def needs_and_takes_all(prompts, completions, answer, **kwargs):  # the README's signature
        assert kwargs.keys() == {"completion_ids", "letter"}
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward 'all' requires \['answer'\]"):
        RewardSet([("all", needs_and_takes_all, 1.0)]).check(["letter"])
    RewardSet([("all", needs_and_takes_all, 1.0)]).check(["letter", "answer"])
    cols = {"letter": ["a", "b", "c"], "answer": [1, 2, 3]}
    assert (
        RewardSet([("all", needs_and_takes_all, 1.0)])(PROMPTS, COMPLETIONS, columns=cols)[0].tolist()
        == [0] * 3
    )


def test_a_positional_only_signature_is_named_not_blamed_on_a_sample():
    def posonly(completions, /):
        return [0.0] * len(completions)

    with pytest.raises(
        RewardError,
        match=r"reward 'posonly': its signature \(completions, /\) does not accept \(prompts, completions, "
        r"\*\*kwargs\) as keywords.*; remove the '/' that makes \['completions'\] positional-only",
    ):
        RewardSet([("posonly", posonly, 1.0)])

    def with_default(flag=False, /, *, completions):  # never given, so never missing
        return [float(flag)] * len(completions)

    _, raw = RewardSet([("with_default", with_default, 1.0)])(PROMPTS, COMPLETIONS)
    assert raw["with_default"].tolist() == [0.0] * 3


def test_letter_reward_through_the_set():
    total, _ = RewardSet([("letter", toy.letter_reward, 1.0)])(
        PROMPTS, COMPLETIONS, columns={"letter": list("abc")}
    )
    assert total.tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_raising_reward_names_the_sample():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 2) for c in completions]  # "ab" divides by zero

    with pytest.raises(
        RewardError,
        match=r"reward 'picky' raised on sample 1 \(prompt 'b\?', completion 'ab'\): "
        r"ZeroDivisionError: float division by zero \(at test_rewards\.py:\d+\)",
    ):
        RewardSet([("picky", picky, 1.0)])(PROMPTS, COMPLETIONS)

    def batch_only(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("too many")
        return [0.0]

    with pytest.raises(
        RewardError,
        match=r"raised on the batch of 3, but no single sample could be blamed "
        r"\(samples 1\.\.2 raise together.*\): RuntimeError: too many",
    ):
        RewardSet([("batch_only", batch_only, 1.0)])(PROMPTS, COMPLETIONS)


def test_a_reward_that_exits_is_a_reward_error_and_ctrl_c_still_stops():
    def exits(prompts, completions, **kw):
        if "ab" in completions:
            sys.exit(3)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward 'exits' raised on sample 1 .*: SystemExit: 3"):
        RewardSet([("exits", exits, 1.0)])(PROMPTS, COMPLETIONS)

    def interrupted(prompts, completions, **kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RewardSet([("interrupted", interrupted, 1.0)])(PROMPTS, COMPLETIONS)


def test_blame_bisects_in_few_calls_and_names_the_source():
    """A judge API may be paid or rate-limited: finding the culprit must not cost one call per sample."""
    calls = []

    def judge(prompts, completions, **kw):
        calls.append(len(completions))
        if "bad" in completions:
            raise ValueError("cannot parse")
        return [1.0] * len(completions)

    prompts, completions = [f"q{i}" for i in range(64)], ["ok"] * 64
    completions[45] = "bad"
    sources = [f"p.jsonl:{i + 1}" for i in range(64)]
    with pytest.raises(
        RewardError,
        match=r"reward 'judge' raised on sample 45 \(p\.jsonl:46, prompt 'q45', completion 'bad'\): "
        r"ValueError: cannot parse",
    ):
        RewardSet([("judge", judge, 1.0)])(prompts, completions, sources=sources)
    assert calls[0] == 64 and len(calls) <= 1 + 2 * 6  # the batch, then two halves per halving at most


def test_score_errors_name_the_source():
    rs = RewardSet([("nan", lambda completions, **kw: [0.0, math.nan, 0.0], 1.0)])
    with pytest.raises(RewardError, match=r"returned nan for sample 1 \(b\.csv:3\)"):
        rs(PROMPTS, COMPLETIONS, sources=["b.csv:2", "b.csv:3", "b.csv:4"])
    with pytest.raises(RewardError, match=r"2 sources for 3 completions"):
        rs(PROMPTS, COMPLETIONS, sources=["b.csv:2", "b.csv:3"])


@pytest.mark.parametrize(
    "out, match",
    [
        (0.5, r"reward 'bad' must return a list of 3 floats, got float"),
        ("abc", r"must return a list of 3 floats, got str"),
        (None, r"must return a list of 3 floats, got NoneType"),
        ([1.0, 2.0], r"reward 'bad' returned 2 scores for 3 completions \(expected 3\)"),
        ([1.0, None, 2.0], r"reward 'bad' returned a non-number for sample 1: None"),
        ([1.0, 2.0, "3"], r"returned a non-number for sample 2: '3'"),
        ([1.0, float("nan"), 2.0], r"returned nan for sample 1; scores must be finite"),
        ([1.0, 2.0, -math.inf], r"returned -inf for sample 2"),
        ([1.0, 2.0, 1e39], r"returned 1e\+39 for sample 2; scores must be finite float32"),
        ([1.0, 10**400, 2.0], r"returned 1000\d*\.\.\.\d*000 for sample 1; scores must be finite"),
        (torch.tensor([[1.0], [2.0], [3.0]]), r"must return a list of 3 floats, got Tensor"),
        ([1.0, torch.tensor([1.0, 2.0]), 2.0], r"non-number for sample 1"),
    ],
)
def test_bad_scores(out, match):
    with pytest.raises(RewardError, match=match):
        RewardSet([("bad", lambda prompts, completions, **kw: out, 1.0)])(PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(
    "out",
    [
        [1, 2.5, True],
        (1, 2.5, True),
        np.array([1.0, 2.5, 1.0], dtype=np.float32),
        torch.tensor([1.0, 2.5, 1.0]),
        [np.float64(1.0), torch.tensor(2.5), np.int64(1)],
    ],
)
def test_accepted_score_types(out):
    _, raw = RewardSet([("ok", lambda prompts, completions, **kw: out, 1.0)])(PROMPTS, COMPLETIONS)
    assert raw["ok"].tolist() == [1.0, 2.5, 1.0]


def test_misaligned_column():
    with pytest.raises(RewardError, match=r"column 'letter' has 2 values for 3 completions"):
        RewardSet([("l", toy.letter_reward, 1.0)])(PROMPTS, COMPLETIONS, columns={"letter": ["a", "b"]})


# ---------------------------------------------------------------------------------------------
# Learned reward models, with a tokenizer different from the policy's.
# ---------------------------------------------------------------------------------------------
def save_reward_model(path, num_labels: int = 1):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    # A different alphabet order: the same characters get different ids than in the policy's tokenizer.
    tokenizer = toy.make_tokenizer(alphabet=toy.ALPHABET[::-1] + "xyz")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=None,  # RewardModel must take it from the tokenizer
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm"))


def test_reward_model_scores_independent_of_batching(reward_model_dir, tokenizer):
    prompts = ["a?", "bb?", "c?", "1+1="]
    completions = ["aaaa", "b", "xyz c", "2"]
    rm = RewardModel(reward_model_dir, batch_size=4)
    assert rm.tokenizer("a")["input_ids"] != tokenizer("a")["input_ids"]  # really a different tokenizer
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id
    scores = rm(prompts, completions)
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) == 4
    single = RewardModel(reward_model_dir, batch_size=1)
    one_by_one = [single([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    assert RewardModel(reward_model_dir, batch_size=3)(prompts, completions) == pytest.approx(
        scores, abs=1e-5
    )
    assert not any(p.requires_grad for p in rm.model.parameters()) and not rm.model.training
    assert rm.name.startswith("reward_model:")


def test_reward_model_keeps_the_end_of_long_texts(reward_model_dir):
    """Past max_length the completion is what is kept (cut from the right, every completion of a long
    prompt would get the prompt's score)."""
    rm = RewardModel(reward_model_dir, max_length=4)
    with pytest.warns(UserWarning, match="longer than 4 tokens keep their last 4"):
        long, short, other = rm(["abcdef", "ef", "abcdef"], ["gh", "gh", "xy"])
    assert long == pytest.approx(short, abs=1e-5) and long != pytest.approx(other, abs=1e-5)


def test_reward_model_scores_conversations_as_the_reward_stage_trained_on_them(reward_model_dir, tmp_path):
    """A prompt given as messages is scored as that conversation with the completion as the assistant's
    turn, rendered by the reward model's template (end-of-turn text included), the token ids that
    `reward` trains on; a text prompt as prompt + completion text."""
    from reinforce_lm.data import load_prompts
    from reinforce_lm.preferences import _pair_ids

    rm = RewardModel(reward_model_dir)
    chat = [{"role": "user", "content": "say a"}]
    pair = {"prompt": chat, "chosen": [{"role": "assistant", "content": "aa"}], "rejected": []}
    trained = _pair_ids(rm.tokenizer, "pairs.jsonl:1", pair)[0]
    rows = write_jsonl(tmp_path / "p.jsonl", [{"messages": chat}, {"prompt": "say a"}])
    data = load_prompts(rows, toy.make_tokenizer())  # the policy's tokenizer renders the prompt
    assert data.columns["messages"] == [chat, None]
    ids = rm.token_ids(data.texts, ["aa", "aa"], data.columns["messages"])
    assert ids == [trained, rm.tokenizer("say aaa")["input_ids"]]
    rs = build_rewards([], [str(reward_model_dir)])
    scores = rs(data.texts, ["aa", "aa"], columns=data.columns)[0]
    assert scores[0].item() == pytest.approx(rm([""], ["aa"], messages=[chat])[0], abs=1e-5)
    assert scores[0].item() != pytest.approx(scores[1].item(), abs=1e-5)
    rm.model.config.reinforce_lm_pairs = "text"  # what `reinforce-lm reward` records for text pairs
    assert (
        rm.token_ids(data.texts, ["aa", "aa"], data.columns["messages"])[0]
        == rm.tokenizer(data.texts[0] + "aa")["input_ids"]
    )


def test_reward_model_errors(tmp_path):
    with pytest.raises(RewardError, match=r"num_labels=2.*exactly one"):
        RewardModel(save_reward_model(tmp_path / "two", num_labels=2))
    with pytest.raises(RewardError, match=r"reward model .*nowhere: cannot load"):
        RewardModel(tmp_path / "nowhere")
    toy.save_tiny_model(tmp_path / "policy", arch="llama")  # an SFT model where a reward model goes
    with pytest.raises(RewardError, match=r"is a causal LM \(LlamaForCausalLM\), not a reward model"):
        RewardModel(tmp_path / "policy")


def test_a_reward_model_is_refused_as_the_policy(reward_model_dir):
    from reinforce_lm.errors import ConfigError
    from reinforce_lm.models import load_causal_lm

    with pytest.raises(ConfigError, match=r"is a LlamaForSequenceClassification .*not a causal LM"):
        load_causal_lm(str(reward_model_dir))


def test_build_rewards(tmp_path, reward_model_dir):
    rs = build_rewards(["reinforce_lm.toy:letter_reward"], [str(reward_model_dir)], weights=[1.0, 0.0])
    assert rs.names[0] == "letter_reward" and rs.names[1].startswith("reward_model:")
    total, raw = rs(PROMPTS, COMPLETIONS, columns={"letter": list("abc")})
    assert total.tolist() == pytest.approx([1.0, 0.5, 0.0]) and raw[rs.names[1]].shape == (3,)
    rs = build_rewards(["reinforce_lm.toy:letter_reward", "reinforce_lm.toy:letter_reward"], [], None)
    assert rs.names == ["letter_reward", "letter_reward_2"]
    with pytest.raises(RewardError, match=r"pass --reward .* --reward-model"):
        build_rewards([], [], None)
    with pytest.raises(RewardError, match=r"got 1 reward weights for 2 rewards"):
        build_rewards(["reinforce_lm.toy:letter_reward"], [str(reward_model_dir)], weights=[1.0])
    # One string where a list is expected: one reward, not one per character.
    rs = build_rewards("reinforce_lm.toy:letter_reward", str(reward_model_dir), None)
    assert rs.names[0] == "letter_reward" and rs.names[1].startswith("reward_model:")


def test_build_rewards_accepts_callables():
    """The Python API (and TRL users) pass reward functions themselves; they are named by __name__."""

    def const(completions, **kwargs):
        return [0.5] * len(completions)

    class Judge:
        def __call__(self, completions, **kwargs):
            raise RuntimeError("judge down")

    rs = build_rewards(
        [const, "reinforce_lm.toy:letter_reward", lambda completions, **kw: [1.0] * len(completions)],
        [],
        [1.0, 1.0, 2.0],
    )
    assert rs.names == ["const", "letter_reward", "<lambda>"]
    total, _ = rs(PROMPTS, COMPLETIONS, columns={"letter": list("abc")})
    assert total.tolist() == pytest.approx([3.5, 3.0, 2.5])
    assert build_rewards(const, [], None).names == ["const"]
    judge_down = (
        r"reward 'Judge' raised on sample 0 .*judge down.*the other half of the batch raised too: "
        r"RuntimeError: 'judge down'; a reward that fails on every call"
    )
    with pytest.raises(RewardError, match=judge_down):
        build_rewards([Judge()], [], None)(PROMPTS, COMPLETIONS)
    with pytest.raises(
        RewardError, match=r"reward 3: expected FILE\.py:FUNCTION, module:FUNCTION or a callable, got int"
    ):
        build_rewards([3], [], None)


def test_reward_model_cuts_texts_to_its_positions(tmp_path):
    """A GPT-2 scorer with 24 learned positions and a 60-token text: cut to 24 (with a warning), not an
    index error past the position table."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = toy.make_tokenizer()
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=24, vocab_size=len(tok), num_labels=1,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = RewardModel(str(tmp_path), max_length=1024)
    assert rm.max_length == 24
    with pytest.warns(UserWarning, match="longer than 24 tokens keep their last 24"):
        scores = rm(["ab" * 30], ["c"])
    assert len(scores) == 1 and math.isfinite(scores[0])


def test_a_reward_that_edits_its_arguments_changes_nothing_for_the_others():
    """A judge that appends the completion to the conversation it is given, and strips completions in
    place: the next function, the other samples of the prompt and the caller's rows stay as they were."""
    conversation = [{"role": "user", "content": "hi"}]
    columns = {"messages": [conversation, conversation], "meta": [{"tags": ["x"]}, {"tags": ["x"]}]}
    seen = []

    def judge(prompts, completions, messages, meta, completion_ids, **_):
        for m, c in zip(messages, completions, strict=True):
            m.append({"role": "assistant", "content": c})
        meta[0]["tags"].append("judged")
        completions[0] = "edited"
        completion_ids[0].append(99)
        return [float(len(m)) for m in messages]

    def after(prompts, completions, messages, meta, completion_ids, **_):
        seen.append((completions, messages, meta, completion_ids))
        return [0.0, 0.0]

    rs = RewardSet([("judge", judge, 1.0), ("after", after, 1.0)])
    _, raw = rs(["p", "p"], [" a", " b"], completion_ids=[[1], [2]], columns=columns)
    assert raw["judge"].tolist() == [2.0, 2.0]  # each sample's own conversation got one turn
    assert seen == [([" a", " b"], [conversation, conversation], [{"tags": ["x"]}] * 2, [[1], [2]])]
    assert conversation == [{"role": "user", "content": "hi"}] and columns["meta"][0] == {"tags": ["x"]}
