"""Template canvases and infilling: generate into the free positions of a fixed layout."""

from __future__ import annotations

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import FREE
from dgemma_rt.tiny import make_tiny

STEPS = 6


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return dgemma_rt.Engine(make_tiny(tmp_path_factory.mktemp("tiny_template")), num_threads=2)


def _random_template(rng, length, vocab, free_fraction):
    t = rng.integers(8, vocab, length)
    t[rng.random(length) < free_fraction] = FREE
    return t


def test_all_free_template_is_plain_generate(engine):
    L = engine.config["canvas_length"]
    ids = [[2, 40, 41, 42], [2, 50]]
    for seed in range(3):
        a = engine.generate(ids, max_new_tokens=2 * L, max_denoising_steps=STEPS, seed=seed)
        b = engine.generate(ids, max_new_tokens=2 * L, max_denoising_steps=STEPS, seed=seed,
                            canvas_template=[[FREE] * (2 * L), [FREE] * L])
        for x, y in zip(a.sequences, b.sequences):
            np.testing.assert_array_equal(x, y)
        assert a.steps_per_canvas == b.steps_per_canvas


@pytest.mark.parametrize("case", range(6))
def test_locked_positions_hold_in_every_draft_and_the_output(engine, case):
    rng = np.random.default_rng(case)
    L, V = engine.config["canvas_length"], engine.config["vocab_size"]
    rows = int(rng.integers(1, 3))
    length = int(rng.integers(1, 2 * L + 1))
    templates = [_random_template(rng, length, V, rng.uniform(0.2, 0.9)) for _ in range(rows)]
    drafts = []
    out = engine.generate([[2, 100 + r] for r in range(rows)], max_new_tokens=2 * L, max_denoising_steps=STEPS,
                          seed=case, eos_token_id=None, canvas_template=templates,
                          on_step=lambda d: drafts.append((len(drafts), d.copy())),
                          on_block=lambda b: drafts.append(("block", b.copy())))
    canvas = 0
    for tag, d in drafts:
        for r, t in enumerate(templates):
            lay = t[canvas * L:(canvas + 1) * L]
            locked = lay != FREE
            np.testing.assert_array_equal(d[r, :len(lay)][locked], lay[locked])
        if tag == "block":
            canvas += 1
    for r, t in enumerate(templates):
        new = out.sequences[r][2:]
        locked = t != FREE
        np.testing.assert_array_equal(new[:len(t)][locked], t[locked])


def _with_eos_rule(free_run, templates, eos, pad, L, canvases):
    """What EOS stopping makes of the EOS-off output: after a row's first EOS (locked or free) its free
    positions are pad and its locked ones keep their token, in that canvas and every later one; the call
    ends when every row has ended, but not before the last canvas its templates lock a position in."""
    rows, ends = [], []
    for x, t in zip(free_run, templates):
        lay = np.full(canvases * L, FREE)
        lay[:len(t)] = t
        hits = np.flatnonzero(np.isin(x, list(eos)))
        end = int(hits[0]) if hits.size else None
        y = np.array(x)
        if end is not None:
            after = np.arange(y.size) > end
            y[after] = np.where(lay[after] != FREE, lay[after], pad)
        rows.append(y)
        ends.append(None if end is None else end // L)
    last_lock = max((int(np.flatnonzero(np.asarray(t) != FREE).max()) // L for t in templates
                     if (np.asarray(t) != FREE).any()), default=0)
    n = canvases if None in ends else min(canvases, max(max(ends), last_lock) + 1)
    return [y[: n * L] for y in rows]


@pytest.mark.parametrize("case", range(4))
def test_eos_stopping_never_pads_locked_positions(engine, case):
    """EOS on (the default): a row that samples EOS in a free position still commits its template's locked
    tokens, in that canvas and in the later canvases the template reaches (which then need no denoising)."""
    rng = np.random.default_rng(100 + case)
    L, V = engine.config["canvas_length"], engine.config["vocab_size"]
    pad = engine.generation_defaults["pad_token_id"]
    rows, canvases = int(rng.integers(1, 3)), 2
    # Many EOS ids, so that the random tiny model ends rows early, in different canvases.
    eos = sorted({int(t) for t in rng.choice(np.arange(8, V), int(rng.integers(5, 200)), replace=False)})
    templates = [_random_template(rng, int(rng.integers(L + 1, canvases * L + 1)), V, rng.uniform(0.5, 0.95))
                 for _ in range(rows)]
    for t in templates:  # locked ids outside the EOS set: the free positions end the rows here
        t[np.isin(t, eos)] = FREE
        t[-1] = 7  # a locked position in the last canvas the template reaches
    prompts = [[2, 100 + r] for r in range(rows)]
    kw = dict(max_new_tokens=canvases * L, max_denoising_steps=STEPS, seed=case, canvas_template=templates,
              pad_token_id=pad)
    free_run = engine.generate(prompts, eos_token_id=None, **kw)
    blocks = []
    out = engine.generate(prompts, eos_token_id=eos, on_block=lambda b: blocks.append(b.copy()), **kw)
    want = _with_eos_rule([s[2:] for s in free_run.sequences], templates, set(eos), pad, L, canvases)
    got = [s[2:] for s in out.sequences]
    for r in range(rows):
        np.testing.assert_array_equal(got[r], want[r])
        locked = templates[r] != FREE
        np.testing.assert_array_equal(got[r][:len(templates[r])][locked], templates[r][locked])
        np.testing.assert_array_equal(np.concatenate([b[r] for b in blocks]), got[r])  # on_block saw the same
    ended = [bool(np.isin(g, eos).any()) for g in got]
    assert any(ended), "no row hit EOS: the case tests nothing"
    for r in range(rows):  # steps only for canvases the row was still generating in
        first = int(np.flatnonzero(np.isin(got[r], eos))[0]) // L if ended[r] else len(got[r]) // L - 1
        assert len(out.steps_per_canvas[r]) == first + 1


def test_stop_generation_skips_the_template_tail(engine):
    """A row ends at EOS in canvas 0, and its template locks a token in canvas 2: the tail canvases are
    committed without denoising, unless on_block raised StopGeneration on canvas 0 (that canvas is the last)."""
    L = engine.config["canvas_length"]
    pad = engine.generation_defaults["pad_token_id"]
    template = [FREE] * (2 * L) + [7]
    kw = dict(max_new_tokens=3 * L, max_denoising_steps=STEPS, seed=4, canvas_template=[template],
              pad_token_id=pad)
    eos = [int(engine.generate([[2, 40]], eos_token_id=None, **kw).sequences[0][2 + 5])]  # canvas 0's 6th token
    tail = engine.generate([[2, 40]], eos_token_id=eos, **kw)
    assert len(tail.sequences[0]) == 2 + 3 * L and tail.sequences[0][2 + 2 * L] == 7 and tail.steps_per_canvas == [[STEPS]]

    def stop(block):
        raise dgemma_rt.StopGeneration

    out = engine.generate([[2, 40]], eos_token_id=eos, on_block=stop, **kw)
    assert out.stopped and len(out.sequences[0]) == 2 + L
    np.testing.assert_array_equal(out.sequences[0], tail.sequences[0][: 2 + L])


def test_eos_stopping_without_a_template_is_unchanged(engine):
    """The same rule with no template: everything after the first EOS is pad and the call ends when every
    row has (the reference's semantics)."""
    L = engine.config["canvas_length"]
    pad = engine.generation_defaults["pad_token_id"]
    eos = list(range(8, 208))
    prompts = [[2, 31], [2, 32]]
    kw = dict(max_new_tokens=2 * L, max_denoising_steps=STEPS, seed=3, pad_token_id=pad)
    free_run = engine.generate(prompts, eos_token_id=None, **kw)
    out = engine.generate(prompts, eos_token_id=eos, **kw)
    want = _with_eos_rule([s[2:] for s in free_run.sequences], [[], []], set(eos), pad, L, 2)
    for g, w in zip(out.sequences, want):
        np.testing.assert_array_equal(g[2:], w)


def test_all_locked_canvas_commits_after_one_step(engine):
    L = engine.config["canvas_length"]
    t = list(range(300, 300 + L)) + [FREE] * L  # the first canvas fully locked, the second free
    out = engine.generate([[2, 7, 8]], max_new_tokens=2 * L, max_denoising_steps=STEPS, eos_token_id=None,
                          adaptive_stopping=False, canvas_template=[t])
    np.testing.assert_array_equal(out.sequences[0][3:3 + L], np.arange(300, 300 + L))
    assert out.steps_per_canvas[0] == [1, STEPS]


def _noise(seed, vocab):
    """noise(kind, shape) for the engine, and the same stream again for the test's own loop."""
    counters = {"canvas": 0, "uniform": 0}

    def fn(kind, shape):
        rng = np.random.default_rng([seed, 0 if kind == "canvas" else 1, counters[kind]])
        counters[kind] += 1
        return rng.integers(0, vocab, shape) if kind == "canvas" else rng.random(shape)

    return fn


def _sample(raw, temperature, u):
    """The engine's sampler rule (backend.h SampleArgs) in numpy, float32 where it uses float."""
    processed = raw / np.float32(temperature)
    mx = processed.max()
    e = np.exp(processed - mx).astype(np.float32)
    total = np.cumsum(e.astype(np.float64))[-1]
    inv = np.float32(1.0) / np.float32(total)
    probs = (e * inv).astype(np.float32)
    lse = np.float32(mx + np.log(np.float32(total)))
    cdf = np.cumsum(probs.astype(np.float64))
    ent = -np.cumsum(probs.astype(np.float64) * (processed - lse).astype(np.float64))[-1]
    tok = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), raw.size - 1)
    return tok, int(np.argmax(processed)), np.float32(ent), processed


def _loop(engine, prompt, template, noise, bound, locked_in_budget=False):
    """One canvas of the documented template rule on the engine's own logits (one row, threshold 1)."""
    L = engine.config["canvas_length"]
    state = engine.encode([prompt])
    lock = np.asarray(template)
    locked = lock != FREE
    canvas = np.asarray(noise("canvas", (1, L))[0])
    canvas[locked] = lock[locked]
    history, sc, steps = None, None, 0
    t_min, t_max = 0.4, 0.8
    for step in range(1, STEPS + 1):
        n = STEPS - step + 1
        temp = np.float32(t_min) + np.float32(t_max - t_min) * (np.float32(n) / np.float32(STEPS))
        u = noise("uniform", (1, L))[0]
        logits = engine.denoise_logits(state, canvas[None].astype(np.int32), self_conditioning_logits=sc)[0]
        res = [_sample(logits[j], temp, u[j]) for j in range(L)]
        sample, argmax = np.array([r[0] for r in res]), np.array([r[1] for r in res])
        ent = np.array([r[2] for r in res], dtype=np.float32)
        processed = np.stack([r[3] for r in res])
        fresh = np.asarray(noise("canvas", (1, L))[0])
        sample[locked], argmax[locked] = lock[locked], lock[locked]
        steps += 1
        budget = np.arange(L) if locked_in_budget else np.flatnonzero(~locked)
        order = budget[np.argsort(ent[budget], kind="stable")]
        cum = 0.0
        new = canvas.copy()
        for j in order:
            cum += float(ent[j])
            new[j] = sample[j] if np.float32(cum) - ent[j] <= np.float32(bound) else fresh[j]
        new[locked] = lock[locked]
        canvas = new
        stable = history is not None and np.array_equal(argmax, history)
        history = argmax
        esum = np.float32(0)
        for j in np.flatnonzero(~locked):
            esum = np.float32(esum + ent[j])
        confident = esum / np.float32((~locked).sum()) < 0.005
        sc = processed[None]
        if stable and confident:
            break
    return argmax, steps


def test_acceptance_budget_ignores_locked_positions(engine):
    """The engine equals the documented rule run on its own logits; counting locked positions in the
    entropy budget (the rule a template must not follow) changes what gets accepted."""
    L, V = engine.config["canvas_length"], engine.config["vocab_size"]
    rng = np.random.default_rng(7)
    differs = 0
    for case in range(3):
        template = _random_template(rng, L, V, 0.5)
        prompt = [2, 60 + case, 61]
        bound = 2.0  # wide enough that the locked positions' entropies would matter
        want, steps = _loop(engine, prompt, template, _noise(case, V), bound)
        out = engine.generate([prompt], max_new_tokens=L, max_denoising_steps=STEPS, eos_token_id=None,
                              entropy_bound=bound, noise=_noise(case, V), canvas_template=[template])
        np.testing.assert_array_equal(out.sequences[0][len(prompt):], want)
        assert out.steps_per_canvas[0] == [steps]
        other, _ = _loop(engine, prompt, template, _noise(case, V), bound, locked_in_budget=True)
        differs += not np.array_equal(other, want)
    assert differs, "the test cannot tell the two acceptance rules apart"


def test_infill_round_trip(engine):
    prefix, suffix = "The quick brown fox", " over the lazy dog."
    middle = engine.infill(prefix, suffix, max_middle_tokens=20, max_denoising_steps=STEPS, seed=1)
    assert isinstance(middle, str)
    tok = engine.tokenizer
    ids = tok.encode(prefix)
    mid = engine.infill(ids, tok.encode(suffix, add_special_tokens=False), max_middle_tokens=20,
                        max_denoising_steps=STEPS, seed=1)
    assert tok.decode(mid) == middle  # the same request through ids
    text = tok.decode(ids + mid + tok.encode(suffix, add_special_tokens=False))
    assert text.startswith(prefix) and text.endswith(suffix)


def test_infill_output_ends_in_the_suffix(engine):
    """The committed canvases themselves (not the middle with the suffix appended by the test) end in the
    suffix's ids, the middle is what comes before it, cut at its first EOS or pad."""
    L = engine.config["canvas_length"]
    tok = engine.tokenizer
    g = engine.generation_defaults
    stop = set(g["eos_token_id"]) | {g["pad_token_id"]}
    for prefix, suffix, n in [("def area(r):\n", "\n    return a\n", 20), ("The quick brown fox", " over the lazy dog.", 70)]:
        suffix_ids = tok.encode(suffix, add_special_tokens=False)
        blocks = []
        middle = engine.infill(tok.encode(prefix), suffix_ids, max_middle_tokens=n, max_denoising_steps=STEPS, seed=3,
                               on_block=lambda b: blocks.append(b[0].copy()))
        generated = [int(t) for t in np.concatenate(blocks)]
        assert len(generated) == -(-(n + len(suffix_ids)) // L) * L
        assert generated[-len(suffix_ids):] == suffix_ids
        assert generated[:len(middle)] == middle
        rest = generated[len(middle):len(generated) - len(suffix_ids)]
        assert not rest or rest[0] in stop  # the middle ends at an EOS/pad, or fills every free position
        # The text route too: the committed canvases end in the suffix's ids.
        blocks.clear()
        engine.infill(prefix, suffix, max_middle_tokens=n, max_denoising_steps=STEPS, seed=3,
                      on_block=lambda b: blocks.append(b[0].copy()))
        assert [int(t) for t in np.concatenate(blocks)[-len(suffix_ids):]] == suffix_ids


def test_infill_text_prefix_is_raw_text_a_chat_goes_through_the_template(engine, monkeypatch):
    """The tiny checkpoint has a chat template: a plain-text prefix is still encoded as it is; a chat is
    rendered with the generation prompt."""
    tok = engine.tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) != tok.encode("x")
    prompts = []
    generate = engine.generate

    def spy(input_ids, **kw):
        prompts.append([int(t) for t in input_ids[0]])
        return generate(input_ids, **kw)

    monkeypatch.setattr(engine, "generate", spy)
    kw = dict(max_middle_tokens=8, max_denoising_steps=2, seed=0)
    engine.infill("def f(x):", "\n    return y", **kw)
    chat = [{"role": "user", "content": "def f(x):"}]
    engine.infill(chat, "\n    return y", **kw)
    assert prompts == [tok.encode("def f(x):"), tok.apply_chat_template(chat)]


def test_native_submit_checks_templates(engine):
    """The C++ scheduler checks templates itself (for the C++ API and other callers of _core), with the
    same messages as the Python layer."""
    L, V = engine.config["canvas_length"], engine.config["vocab_size"]
    base = engine._params({"max_new_tokens": L, "max_denoising_steps": 1})
    for template, words in [
        ([[FREE] * (L + 1)], f"row 0 has {L + 1} positions, more than max_new_tokens {L}"),
        ([[FREE, FREE, FREE, V]], f"row 0 position 3 holds {V}: a token id in \\[0, {V}\\) or -1"),
        ([[-2]], "row 0 position 0 holds -2"),
        ([[FREE], [FREE]], "canvas_template has 2 rows but input_ids has 1"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine._native.submit([[2, 3, 4]], {**base, "canvas_template": template})
    # and a good one goes through
    req = engine._native.submit([[2, 3, 4]], {**base, "canvas_template": [[FREE, 9]]})
    assert req.wait(60)
    assert req.result()["new_tokens"][0][1] == 9


def test_bad_templates(engine):
    L, V = engine.config["canvas_length"], engine.config["vocab_size"]
    with pytest.raises(ValueError, match="more than max_new_tokens"):
        engine.generate([[2, 3]], max_new_tokens=L, canvas_template=[[FREE] * (L + 1)])
    with pytest.raises(ValueError, match=r"position 3 holds 2048"):
        engine.generate([[2, 3]], max_new_tokens=L, canvas_template=[[FREE, FREE, FREE, V]])
    with pytest.raises(ValueError, match=r"position 0 holds -2"):
        engine.generate([[2, 3]], max_new_tokens=L, canvas_template=[[-2]])
    with pytest.raises(ValueError, match="has 1 rows but input_ids has 2"):
        engine.generate([[2, 3], [2, 4]], canvas_template=[[FREE]])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        engine.generate([[2, 3]], canvas_template=[[0.5]])
    with pytest.raises(ValueError, match="2-D integer array or a list"):
        engine.generate([[2, 3]], canvas_template="abc")
    with pytest.raises(TypeError, match="builds canvas_template itself"):
        engine.infill("a", "b", canvas_template=[[1]])
    with pytest.raises(ValueError, match="suffix must be text too"):
        engine.infill("a", [1, 2])


def test_infill_checks_the_length_before_building_the_template(engine, monkeypatch):
    """A middle beyond max_position_embeddings is refused before its template is built (2**28 used to take
    43 s and 6 GB before generate() refused it) and before generate() is called."""
    called = []
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: called.append(kw) or pytest.fail("generate() called"))
    max_pos = engine.config["max_position_embeddings"]
    for n in (max_pos, 10**6):
        with pytest.raises(ValueError, match="max_middle_tokens.*exceeds max_position_embeddings"):
            engine.infill([2, 3], [4], max_middle_tokens=n)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        engine.infill([2] * (max_pos - 64), [4], max_middle_tokens=64)  # the suffix takes a second canvas
    assert not called


def test_infill_checks_token_ids_as_generate_does(engine):
    V = engine.config["vocab_size"]
    for prefix, suffix, words in [
        ([2.5, 3], [4], "prefix must hold integer token ids"),
        ([2, 3], [4.0], "suffix must hold integer token ids"),
        ([[2, 3]], [4], "prefix must be a flat sequence"),
        (np.array([[2, 3]]), [4], "prefix must be a flat sequence"),
        ([2, 3], [[4]], "suffix must be a flat sequence"),
        ([], [3], "non-empty prefix"),
        ([], "x", "non-empty prefix"),
        (np.array([], dtype=np.int64), [3], "non-empty prefix"),
        ([2, 3], None, "suffix must be a flat sequence"),
        ([2, V], [4], f"prefix token id {V} is outside the vocabulary"),
        ([2, 3], [-1], "suffix token id -1 is outside the vocabulary"),  # -1 would have been a free position
        (None, [4], "prefix must be a flat sequence of integer token ids, got NoneType"),
        ({"role": "user", "content": "hi"}, "x", "prefix is one message: a chat is a list"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine.infill(prefix, suffix, max_middle_tokens=8, max_denoising_steps=1)
    # numpy ids and an empty suffix are fine
    assert isinstance(engine.infill(np.array([2, 3]), np.array([], dtype=np.int32), max_middle_tokens=8,
                                    max_denoising_steps=1), list)
