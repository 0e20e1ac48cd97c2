"""mat_ds.data with real components: the embedded corpus, datasets' text loader, sentencepiece, torch generators."""
import gzip
import hashlib
import math
import os
import re
from pathlib import Path

import pytest
import torch

from mat_ds.config import DataConfig
from mat_ds.data import (DEFAULT_CORPUS, DataError, Tokenizer, block_indices, build_tokenizer, eval_batch_count,
                         global_positions, iter_eval_batches, load_texts, make_batch, prepare_data)

SHARED_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
VOCAB = 256


class Barrier:
    """Counts calls: every rank must call barrier() the same number of times whatever the cache state."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def corpus_lines() -> list[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as fh:
        return fh.read().split("\n")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    """The first ~300 lines (~80 KB, blank lines included) of the embedded corpus."""
    return write_lines(tmp_path_factory.mktemp("text") / "small.txt", corpus_lines()[:300])


@pytest.fixture(scope="module")
def tok_and_dir(small_file, tmp_path_factory) -> tuple[Tokenizer, Path]:
    cache = tmp_path_factory.mktemp("tok_cache")
    tok = build_tokenizer(load_texts(str(small_file), cache_dir=str(cache / "ds")), VOCAB, str(cache), is_main=True,
                          barrier=Barrier())
    return tok, cache


@pytest.fixture(scope="module")
def tok(tok_and_dir) -> Tokenizer:
    return tok_and_dir[0]


def assert_one_line_error(exc_info, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------------------------------------------------
# Loading text
# ----------------------------------------------------------------------------------------------------------------------
def test_default_corpus_loads_and_is_large(tmp_path):
    assert DEFAULT_CORPUS.name.endswith(".txt.gz") and DEFAULT_CORPUS.is_file()
    ds = load_texts("default", cache_dir=str(tmp_path))  # datasets reads the .gz directly
    assert ds.column_names == ["text"]
    assert ds.num_rows == 3760
    texts = ds["text"]
    assert sum(len(t) for t in texts) > 1_000_000
    assert sum(1 for t in texts if t.strip()) == 2461
    assert texts[1].strip() == "= Homarus gammarus ="
    # the README's checksum is the one of the uncompressed text
    raw = gzip.decompress(DEFAULT_CORPUS.read_bytes())
    readme = (DEFAULT_CORPUS.parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(raw).hexdigest() in readme


@pytest.mark.skipif(not SHARED_VALID.is_file(), reason="shared/ WikiText-2 copy not next to the repo")
def test_default_corpus_is_the_shared_wikitext2_valid_split():
    assert gzip.decompress(DEFAULT_CORPUS.read_bytes()) == SHARED_VALID.read_bytes()


def test_directory_and_glob_are_sorted_and_gz_is_read(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    write_lines(d / "b.txt", ["bravo one", "bravo two"])
    write_lines(d / "a.txt", ["alpha"])
    with gzip.open(d / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("charlie\n")
    (d / "notes.md").write_text("not text data\n")
    cache = str(tmp_path / "cache")
    assert load_texts(str(d), cache_dir=cache)["text"] == ["alpha", "bravo one", "bravo two", "charlie"]
    assert load_texts(str(d / "*.txt"), cache_dir=cache)["text"] == ["alpha", "bravo one", "bravo two"]
    assert load_texts(str(d / "b.txt"), cache_dir=cache)["text"] == ["bravo one", "bravo two"]


def _bad_inputs(tmp_path: Path) -> dict:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    (tmp_path / "fake.txt.gz").write_bytes(b"this is not gzip data")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.csv").write_text("a,b\n")
    return {
        "missing": (tmp_path / "nope.txt", ["does not exist"]),
        "empty": (tmp_path / "empty.txt", ["is empty"]),
        "whitespace": (tmp_path / "blank.txt", ["only whitespace"]),
        # "café ok\n" is 9 bytes in UTF-8, then "na" -> the latin-1 ï is at byte 11
        "not_utf8": (tmp_path / "latin1.txt", ["not valid UTF-8", "byte offset 11", "0xef"]),
        "bad_gzip": (tmp_path / "fake.txt.gz", ["gzip"]),
        "no_txt_in_dir": (tmp_path / "nodocs", ["no *.txt"]),
        "glob_no_match": (tmp_path / "*.nothing", ["no files match"]),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "whitespace", "not_utf8", "bad_gzip", "no_txt_in_dir",
                                  "glob_no_match"])
def test_load_errors_name_the_path(tmp_path, case):
    path, needles = _bad_inputs(tmp_path)[case]
    with pytest.raises(DataError) as exc_info:
        load_texts(str(path), cache_dir=str(tmp_path / "cache"))
    assert_one_line_error(exc_info, str(path), *needles)


def test_bad_file_among_good_ones_is_reported(tmp_path):
    write_lines(tmp_path / "a.txt", ["fine"])
    (tmp_path / "b.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError) as exc_info:
        load_texts(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert_one_line_error(exc_info, str(tmp_path / "b.txt"), "byte offset 3")


def test_hub_spec(tmp_path):
    # 'hf:' goes through datasets.load_dataset(NAME, CONFIG, split=...); a local dataset directory needs no network
    d = tmp_path / "hubdir"
    d.mkdir()
    write_lines(d / "train.txt", ["first line", "second line"])
    cache = str(tmp_path / "cache")
    assert load_texts(f"hf:{d}", cache_dir=cache)["text"] == ["first line", "second line"]
    with pytest.raises(DataError) as exc_info:
        load_texts(f"hf:{tmp_path / 'no_such_dataset'}::validation", cache_dir=cache)
    assert_one_line_error(exc_info, "cannot load hub dataset", "no_such_dataset", "split=validation")
    with pytest.raises(DataError):
        load_texts("hf:", cache_dir=cache)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def test_tokenizer_special_ids_and_round_trip(tok):
    specials = [tok.pad_id, tok.mask_id, tok.eos_id, tok.unk_id]
    assert len(set(specials)) == 4
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in specials)
    assert tok.vocab_size == VOCAB
    assert not set(tok.normal_ids.tolist()) & set(specials)
    assert len(tok.normal_ids) == VOCAB - 4
    text = "The lobster is a species of <unk> crustacean ."
    ids = tok.encode([text, ""])
    assert ids[1] == [] and tok.unk_id in ids[0]
    assert not set(ids[0]) & {tok.pad_id, tok.mask_id, tok.eos_id}
    assert tok.decode(ids[0]) == text
    assert tok.decode(torch.tensor(ids[0])) == text
    assert tok.encode("<mask> </s> <pad>") and tok.mask_id not in tok.encode("<mask>")  # control pieces never from text


def test_tokenizer_cache_hit_and_rank_protocol(tok_and_dir, small_file):
    tok, cache = tok_and_dir
    model = Path(tok.model_path)
    assert model.parent == cache and model.suffix == ".model"
    os.utime(model, (1_000_000, 1_000_000))  # a retrain would rewrite it (os.replace -> new mtime)
    ds = load_texts(str(small_file), cache_dir=str(cache / "ds"))
    for is_main in (True, False):
        barrier = Barrier()
        again = build_tokenizer(ds, VOCAB, str(cache), is_main=is_main, barrier=barrier)
        assert barrier.calls == 1
        assert again.model_path == tok.model_path and again.fingerprint == tok.fingerprint
    assert model.stat().st_mtime == 1_000_000
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == [model.name]  # no temp files left behind


def test_tokenizer_is_deterministic_and_keyed_by_settings(tok, small_file, tmp_path):
    ds = load_texts(str(small_file), cache_dir=str(tmp_path / "ds"))
    fresh = build_tokenizer(ds, VOCAB, str(tmp_path), is_main=True, barrier=Barrier())
    assert fresh.fingerprint == tok.fingerprint  # retrained from scratch: same pieces
    other = build_tokenizer(ds, VOCAB + 64, str(tmp_path), is_main=True, barrier=Barrier())
    assert other.model_path != fresh.model_path and other.vocab_size == VOCAB + 64


def test_non_main_rank_without_cache_fails_cleanly(small_file, tmp_path):
    ds = load_texts(str(small_file), cache_dir=str(tmp_path / "ds"))
    barrier = Barrier()
    with pytest.raises(DataError) as exc_info:
        build_tokenizer(ds, VOCAB, str(tmp_path / "empty_cache"), is_main=False, barrier=barrier)
    assert_one_line_error(exc_info, "missing", "cache_dir")
    assert barrier.calls == 1


def test_corpus_too_small_for_vocab(tmp_path):
    ds = load_texts(str(write_lines(tmp_path / "tiny.txt", corpus_lines()[:4])), cache_dir=str(tmp_path / "ds"))
    barrier = Barrier()
    with pytest.raises(DataError) as exc_info:
        build_tokenizer(ds, 4096, str(tmp_path), is_main=True, barrier=barrier)
    msg = assert_one_line_error(exc_info, "vocab_size=4096", "--vocab_size")
    limit = int(re.search(r"<= (\d+)", msg).group(1))
    assert barrier.calls == 1  # the other ranks were released before the error
    assert build_tokenizer(ds, limit, str(tmp_path), is_main=True, barrier=Barrier()).vocab_size == limit


# ----------------------------------------------------------------------------------------------------------------------
# prepare_data: packing, splits, caches, errors
# ----------------------------------------------------------------------------------------------------------------------
def expected_blocks(path: Path, tok: Tokenizer, seq_len: int) -> torch.Tensor:
    lines = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    stream = []
    for ids in tok.encode(lines):
        stream += ids + [tok.eos_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def test_prepare_data_packs_and_holds_out_the_tail(small_file, tmp_path):
    cfg = DataConfig(train_data=str(small_file), seq_len=32, vocab_size=VOCAB, val_fraction=0.1,
                     cache_dir=str(tmp_path))
    barrier = Barrier()
    b = prepare_data(cfg, is_main=True, barrier=barrier)
    assert barrier.calls == 3
    full = expected_blocks(small_file, b.tokenizer, 32)
    n = len(full)
    assert n > 100
    assert b.train.dtype == b.val.dtype == torch.long
    assert b.val.shape == (math.ceil(0.1 * n), 32) and b.train.shape == (n - len(b.val), 32)
    assert torch.equal(torch.cat([b.train, b.val]), full)  # train = head, val = contiguous tail: no overlap
    assert b.test is None
    assert (b.train == b.tokenizer.eos_id).any() and not (b.train == b.tokenizer.pad_id).any()

    # second run (main, then another rank): cache hits, nothing rewritten, same tensors
    cached = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert sorted(p.suffix for p in cached) == [".model", ".pt"]
    for p in cached:
        os.utime(p, (1_000_000, 1_000_000))
    for is_main in (True, False):
        barrier = Barrier()
        again = prepare_data(cfg, is_main=is_main, barrier=barrier)
        assert barrier.calls == 3
        assert torch.equal(again.train, b.train) and torch.equal(again.val, b.val)
    assert all(p.stat().st_mtime == 1_000_000 for p in cached)

    # seq_len is part of the block cache key
    b64 = prepare_data(DataConfig(train_data=str(small_file), seq_len=64, vocab_size=VOCAB, val_fraction=0.1,
                                  cache_dir=str(tmp_path)), is_main=True, barrier=Barrier())
    assert b64.train.shape[1] == 64 and b64.tokenizer.model_path == b.tokenizer.model_path


def test_prepare_data_with_val_and_test_files(small_file, tmp_path):
    lines = corpus_lines()
    val = write_lines(tmp_path / "val.txt", lines[300:380])
    test = write_lines(tmp_path / "test.txt", lines[380:460])
    cfg = DataConfig(train_data=str(small_file), val_data=str(val), test_data=str(test), seq_len=32,
                     vocab_size=VOCAB, cache_dir=str(tmp_path / "cache"))
    barrier = Barrier()
    b = prepare_data(cfg, is_main=True, barrier=barrier)
    assert barrier.calls == 3
    assert torch.equal(b.train, expected_blocks(small_file, b.tokenizer, 32))  # nothing held out
    assert torch.equal(b.val, expected_blocks(val, b.tokenizer, 32))
    assert torch.equal(b.test, expected_blocks(test, b.tokenizer, 32))


def test_prepare_data_too_few_blocks(small_file, tmp_path):
    cfg = DataConfig(train_data=str(small_file), seq_len=1 << 16, vocab_size=VOCAB, cache_dir=str(tmp_path))
    with pytest.raises(DataError) as exc_info:
        prepare_data(cfg, is_main=True, barrier=Barrier())
    assert_one_line_error(exc_info, str(small_file), "tokens", "--seq_len")
    tiny_val = write_lines(tmp_path / "v.txt", ["just a few words"])
    cfg = DataConfig(train_data=str(small_file), val_data=str(tiny_val), seq_len=32, vocab_size=VOCAB,
                     cache_dir=str(tmp_path))
    with pytest.raises(DataError) as exc_info:
        prepare_data(cfg, is_main=True, barrier=Barrier())
    assert_one_line_error(exc_info, str(tiny_val), "tokens", "--seq_len")


def test_prepare_data_error_on_main_still_reaches_the_barrier(tmp_path):
    barrier = Barrier()
    with pytest.raises(DataError) as exc_info:
        prepare_data(DataConfig(train_data=str(tmp_path / "missing.txt"), cache_dir=str(tmp_path)), is_main=True,
                     barrier=barrier)
    assert_one_line_error(exc_info, "missing.txt", "does not exist")
    assert barrier.calls == 1


def _dist_worker(rank: int, cfgs: list, store: str, out: str) -> None:
    """One of two real gloo ranks running prepare_data (once per config) with torch.distributed's barrier."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    results = []
    for cfg in cfgs:
        try:
            b = prepare_data(cfg, is_main=rank == 0, barrier=dist.barrier)
            results.append({"train": b.train, "val": b.val, "model": b.tokenizer.model_path})
        except DataError as exc:
            results.append({"error": str(exc)})
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_real_ranks_share_one_cache(small_file, tmp_path):
    import time

    import torch.multiprocessing as mp

    good = DataConfig(train_data=str(small_file), seq_len=32, vocab_size=VOCAB, cache_dir=str(tmp_path / "cache"))
    # fails on the main rank only (corpus too small for the vocabulary): both ranks must end with a DataError, no hang
    bad = DataConfig(train_data=str(small_file), seq_len=32, vocab_size=50_000, cache_dir=str(tmp_path / "cache"))
    ctx = mp.start_processes(_dist_worker, args=([good, bad], str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("ranks did not finish within 120 s (barrier mismatch?)")
    (g0, b0), (g1, b1) = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert g0["model"] == g1["model"]
    assert torch.equal(g0["train"], g1["train"]) and torch.equal(g0["val"], g1["val"])
    assert "--vocab_size" in b0["error"] and "missing" in b1["error"]


# ----------------------------------------------------------------------------------------------------------------------
# Order: positions and permutations
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1, 7])
def test_global_positions_same_samples_for_any_rank_accum_split(step):
    mb = 3
    one_rank = torch.cat([global_positions(step, m, 0, 1, mb, 2) for m in range(2)])
    two_ranks = torch.cat([global_positions(step, 0, r, 2, mb, 1) for r in range(2)])
    assert torch.equal(one_rank, two_ranks)
    four = torch.cat([global_positions(step, m, r, 2, mb, 2) for m in range(2) for r in range(2)])
    assert torch.equal(four, torch.arange(step * 4 * mb, (step + 1) * 4 * mb))  # contiguous, no gaps, no overlap
    assert global_positions(step, 0, 0, 1, mb, 1).dtype == torch.long


def test_block_indices_is_a_permutation_per_epoch():
    n, seed = 37, 5
    e0 = block_indices(torch.arange(0, n), n, seed)
    e1 = block_indices(torch.arange(n, 2 * n), n, seed)
    for e in (e0, e1):
        assert torch.equal(e.sort().values, torch.arange(n))
    assert not torch.equal(e0, e1)  # a fresh permutation per epoch
    assert not torch.equal(e0, torch.arange(n))
    assert torch.equal(block_indices(torch.arange(0, 2 * n), n, seed), torch.cat([e0, e1]))
    assert torch.equal(block_indices(torch.tensor([n + 4, 2]), n, seed), torch.stack([e1[4], e0[2]]))
    assert not torch.equal(block_indices(torch.arange(n), n, seed + 1), e0)


# ----------------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------------
def random_blocks(tok: Tokenizer, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return tok.normal_ids[torch.randint(len(tok.normal_ids), (n, seq_len), generator=g)]


def test_clm_batch(tok):
    blocks = random_blocks(tok, 20, 16)
    pos = global_positions(3, 1, 1, 2, 4, 2)
    batch = make_batch(blocks, pos, objective="clm", tokenizer=tok, mlm_probability=0.15, seed=9)
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(batch["input_ids"], blocks[block_indices(pos, 20, 9)])
    plain = make_batch(blocks, torch.tensor([3, 25]), objective="clm", tokenizer=tok, mlm_probability=0.15, seed=9,
                       shuffle=False)
    assert torch.equal(plain["input_ids"], blocks[[3, 5]])
    first10 = make_batch(blocks, torch.arange(10), objective="clm", tokenizer=tok, mlm_probability=0.15, seed=9,
                         n_blocks_for_order=10)
    assert sorted(first10["input_ids"][:, 0].tolist()) == sorted(blocks[:10, 0].tolist())


def mlm(blocks, pos, tok, p=0.15, seed=3, shuffle=True):
    return make_batch(blocks, pos, objective="mlm", tokenizer=tok, mlm_probability=p, seed=seed, shuffle=shuffle)


def test_mlm_masking_statistics_and_labels(tok):
    blocks = random_blocks(tok, 64, 128)
    pos = torch.arange(512)
    batch = mlm(blocks, pos, tok)
    orig = blocks[block_indices(pos, 64, 3)]
    inputs, labels = batch["input_ids"], batch["labels"]
    assert inputs.shape == labels.shape == (512, 128) and inputs.dtype == labels.dtype == torch.long
    selected = labels != -100
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    assert selected.any(dim=1).all()
    assert torch.equal(labels[selected], orig[selected])  # label = original id where selected ...
    assert torch.equal(inputs[~selected], orig[~selected])  # ... and nothing else is touched
    sel_in, sel_orig = inputs[selected], orig[selected]
    masked = sel_in == tok.mask_id
    replaced = ~masked & (sel_in != sel_orig)
    kept = sel_in == sel_orig
    assert abs(masked.float().mean().item() - 0.8) < 0.03
    assert abs(replaced.float().mean().item() - 0.1) < 0.03
    assert abs(kept.float().mean().item() - 0.1) < 0.03
    assert not set(sel_in[~masked].tolist()) & set(tok.special_ids)  # random tokens are never special


def test_mlm_mask_depends_only_on_seed_and_position(tok):
    blocks = random_blocks(tok, 16, 64)
    # two ranks x accum 1 vs one rank x accum 2: the same sample gets the same mask
    a = [mlm(blocks, global_positions(5, 0, r, 2, 4, 1), tok) for r in range(2)]
    b = [mlm(blocks, global_positions(5, m, 0, 1, 4, 2), tok) for m in range(2)]
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([x[key] for x in a]), torch.cat([x[key] for x in b]))
    # a sample alone gives the same row as inside a larger batch (resume, other micro-batch sizes)
    big = mlm(blocks, torch.arange(40, 48), tok)
    alone = mlm(blocks, torch.tensor([45]), tok)
    assert torch.equal(alone["input_ids"][0], big["input_ids"][5]) and torch.equal(alone["labels"][0], big["labels"][5])
    # the same block at another position (another epoch) is masked differently; another seed too
    same_block = mlm(blocks, torch.tensor([2, 2 + 16, 2 + 32]), tok, shuffle=False)["labels"]
    assert not torch.equal(same_block[0] != -100, same_block[1] != -100)
    assert not torch.equal(same_block[1] != -100, same_block[2] != -100)
    other_seed = mlm(blocks, torch.arange(40, 48), tok, seed=4)["labels"]
    assert not torch.equal(other_seed != -100, big["labels"] != -100)


def test_mlm_never_selects_pad_and_selects_at_least_one(tok):
    blocks = random_blocks(tok, 8, 64)
    blocks[:, 32:] = tok.pad_id
    blocks[0, 1:] = tok.pad_id  # a single real token
    batch = mlm(blocks, torch.arange(200), tok, p=0.3)
    orig = blocks[block_indices(torch.arange(200), 8, 3)]
    selected = batch["labels"] != -100
    assert not (selected & (orig == tok.pad_id)).any()
    assert torch.equal(batch["input_ids"][orig == tok.pad_id], orig[orig == tok.pad_id])
    lonely = (orig[:, 1:] == tok.pad_id).all(dim=1)
    assert lonely.any() and selected[lonely, 0].all()
    rare = mlm(random_blocks(tok, 8, 32), torch.arange(64), tok, p=0.001)
    assert ((rare["labels"] != -100).sum(dim=1) >= 1).all()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_each_block_at_most_once(tok, world):
    n, mb = 23, 4
    blocks = torch.arange(n).repeat_interleave(8).view(n, 8)  # block i is all i
    full = n // (world * mb)
    seen = []
    for rank in range(world):
        batches = list(iter_eval_batches(blocks, mb, rank, world, 0, "clm", tok, 0.15, 0))
        assert len(batches) == eval_batch_count(n, mb, world, 0) == full  # same count on every rank
        assert all(len(b["input_ids"]) == mb for b in batches)
        seen += [int(i) for b in batches for i in b["input_ids"][:, 0]]
    assert len(seen) == len(set(seen)) == full * world * mb  # no block twice within a pass
    limited = []
    for rank in range(world):
        batches = list(iter_eval_batches(blocks, mb, rank, world, 2, "clm", tok, 0.15, 0))
        assert len(batches) == min(2, full)
        limited += [int(i) for b in batches for i in b["input_ids"][:, 0]]
    assert len(limited) == len(set(limited)) == min(full, 2) * world * mb


def test_eval_masks_are_the_same_every_pass(tok):
    blocks = random_blocks(tok, 10, 32)
    one = list(iter_eval_batches(blocks, 4, 0, 1, 0, "mlm", tok, 0.15, 11))
    two = list(iter_eval_batches(blocks, 4, 0, 1, 0, "mlm", tok, 0.15, 11))
    assert [len(b["labels"]) for b in one] == [4, 4]
    for x, y in zip(one, two):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
