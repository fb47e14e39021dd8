"""The encrypted preference memory: real SQLite files, real AES-GCM and Argon2id."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpal.client.encryption import CorruptRecordError, KdfParams, WrongPassphraseError
from fedpal.client.memory import CorruptRecordWarning, PreferenceMemory
from fedpal.common.errors import FedpalError
from fedpal.common.types import PreferencePair, SFTExample

PASS = "correct horse battery staple"
# Cheap Argon2id for tests that open many stores; passed explicitly, never a default.
FAST_KDF = KdfParams(memory_cost_kib=64, iterations=1, lanes=1)


def db_bytes(home: Path) -> bytes:
    """Everything SQLite keeps on disk for the memory: the file, its WAL and shared memory."""
    db = home / "memory.sqlite"
    return b"".join(
        p.read_bytes() for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if p.exists()
    )


def stored_bytes(home: Path) -> bytes:
    """The database file and its WAL: what holds data (the -shm index changes on every read)."""
    db = home / "memory.sqlite"
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Split on newlines only: exported text may hold U+2028 and friends, which splitlines() would cut."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


SAMPLE = [
    {"kind": "stated", "text": "I prefer answers under fifty words", "tags": ["style"]},
    {"kind": "stated", "text": "Use metric units, never imperial"},
    {
        "kind": "pair",
        "prompt": "How does the rust borrow checker work?",
        "chosen": "Ownership rules checked at compile time.",
        "rejected": "Rust is a reddish oxide of iron.",
        "tags": ["programming", "rust"],
    },
    {"kind": "rating", "prompt": "Tell me a joke", "response": "Why did the chicken cross?", "score": 2},
    {"kind": "rating", "prompt": "Tell me a joke", "response": "A pun about compilers", "score": 5},
    {"kind": "rating", "prompt": "Tell me a joke", "response": "A knock-knock joke", "score": 4},
    {
        "kind": "edit",
        "prompt": "Summarize the meeting",
        "response": "The meeting covered many long topics.",
        "edited": "Budget approved; launch in May.",
        "tags": ["work"],
    },
    {"kind": "turn", "role": "user", "text": "Plan a trip to Lisbon ünïcödé 東京", "tags": ["travel"]},
]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "client"


@pytest.fixture
def memory(home: Path):
    with PreferenceMemory.open(home, PASS) as mem:
        yield mem


def test_file_holds_none_of_the_texts_or_tags(home: Path, tmp_path: Path):
    with PreferenceMemory.open(home, PASS) as mem:
        mem.import_jsonl(write_jsonl(tmp_path / "in.jsonl", SAMPLE))
        mem.add_stated("secret-stated-preference", tags=["secret-tag-one"])
        mem.add_turn("assistant", "secret assistant turn", tags=["secret-tag-two"])
        open_bytes = db_bytes(home)
    closed_bytes = db_bytes(home)
    secrets = ["secret-stated-preference", "secret-tag-one", "secret-tag-two", "secret assistant turn"]
    for line in SAMPLE:
        secrets += [v for k, v in line.items() if k != "kind" and isinstance(v, str)] + line.get("tags", [])
    for blob in (open_bytes, closed_bytes):
        for secret in secrets:
            for encoding in ("utf-8", "utf-16-le"):
                assert secret.encode(encoding) not in blob, secret
        assert PASS.encode() not in blob


def test_default_key_derivation_is_owasp_argon2id(home: Path):
    PreferenceMemory.open(home, PASS).close()
    with sqlite3.connect(home / "memory.sqlite") as conn:
        kdf = json.loads(conn.execute("SELECT value FROM meta WHERE name = 'kdf'").fetchone()[0])
    assert kdf["memory_cost_kib"] >= 19 * 1024 and kdf["iterations"] >= 2 and kdf["lanes"] == 1
    assert len(kdf["salt"]) >= 20  # base64 of a 16-byte random salt


def test_reopen_with_env_passphrase_reads_everything_back(home: Path, monkeypatch):
    with PreferenceMemory.open(home, PASS) as mem:
        rid = mem.add_pair("p", "c", "r", tags=["a", "b"])
    monkeypatch.setenv("FEDPAL_PASSPHRASE", PASS)
    with PreferenceMemory.open(home) as mem:
        [record] = mem.records()
    assert (record.id, record.kind, record.tags) == (rid, "pair", ["a", "b"])
    assert record.fields == {"prompt": "p", "chosen": "c", "rejected": "r"}
    assert (home / "memory.sqlite").stat().st_mode & 0o077 == 0


def test_missing_passphrase_says_how_to_give_one_and_creates_nothing(home: Path, monkeypatch):
    monkeypatch.delenv("FEDPAL_PASSPHRASE", raising=False)
    with pytest.raises(FedpalError, match="FEDPAL_PASSPHRASE"):
        PreferenceMemory.open(home)
    assert not (home / "memory.sqlite").exists()


def test_wrong_passphrase_is_one_clear_error_and_leaves_file_untouched(home: Path):
    with PreferenceMemory.open(home, PASS) as mem:
        mem.add_stated("keep me")
    before = sha(home / "memory.sqlite")
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        PreferenceMemory.open(home, "not the passphrase")
    assert sha(home / "memory.sqlite") == before
    with PreferenceMemory.open(home, PASS) as mem:
        assert [r.fields["text"] for r in mem.records()] == ["keep me"]


def test_not_a_database_is_a_clear_error(home: Path):
    home.mkdir(parents=True)
    (home / "memory.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(FedpalError, match="not a readable fedpal memory"):
        PreferenceMemory.open(home, PASS)


def test_truncated_file_is_a_clear_error(home: Path, tmp_path: Path):
    with PreferenceMemory.open(home, PASS) as mem:
        mem.import_jsonl(
            write_jsonl(tmp_path / "in.jsonl", [{"kind": "stated", "text": "x" * 400 + str(i)} for i in range(200)])
        )
    db = home / "memory.sqlite"
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with pytest.raises(FedpalError, match="malformed|not a readable"):
        with PreferenceMemory.open(home, PASS) as mem:
            mem.records()


def _sql(home: Path, statement: str, *args) -> None:
    with sqlite3.connect(home / "memory.sqlite") as conn:
        conn.execute(statement, args)


def _sealed(home: Path, record_id: str) -> bytes:
    with sqlite3.connect(home / "memory.sqlite") as conn:
        return conn.execute("SELECT sealed FROM records WHERE id = ?", (record_id,)).fetchone()[0]


def test_tampered_truncated_and_relabelled_records_are_named_and_the_rest_stays_readable(home: Path, tmp_path):
    with PreferenceMemory.open(home, PASS) as mem:
        ids = [mem.add_stated(f"preference {i}") for i in range(5)]
    flipped = bytearray(_sealed(home, ids[0]))
    flipped[20] ^= 0x01
    _sql(home, "UPDATE records SET sealed = ? WHERE id = ?", bytes(flipped), ids[0])
    _sql(home, "UPDATE records SET sealed = ? WHERE id = ?", _sealed(home, ids[1])[:-5], ids[1])
    _sql(home, "UPDATE records SET kind = 'pair' WHERE id = ?", ids[2])
    _sql(home, "UPDATE records SET sealed = ? WHERE id = ?", _sealed(home, ids[4]), ids[3])  # moved ciphertext
    bad = set(ids[:4])
    with PreferenceMemory.open(home, PASS) as mem:
        assert set(mem.verify()) == bad
        with pytest.warns(CorruptRecordWarning) as caught:
            readable = mem.records()
        assert [r.id for r in readable] == [ids[4]]
        assert all(i in str(caught[0].message) for i in bad)
        with pytest.raises(CorruptRecordError) as err:
            mem.records(strict=True)
        assert set(err.value.record_ids) == bad
        with pytest.raises(CorruptRecordError):
            mem.export_jsonl(tmp_path / "out.jsonl")
        assert not (tmp_path / "out.jsonl").exists()
        with pytest.warns(CorruptRecordWarning):
            assert mem.export_jsonl(tmp_path / "out.jsonl", skip_corrupt=True) == 1
        assert mem.forget(sorted(bad)) == 4
        assert mem.verify() == []


def test_import_export_round_trip(home: Path, tmp_path: Path):
    source = write_jsonl(tmp_path / "in.jsonl", SAMPLE)
    with PreferenceMemory.open(home, PASS) as mem:
        assert mem.import_jsonl(source) == len(SAMPLE)
        assert mem.export_jsonl(tmp_path / "out.jsonl") == len(SAMPLE)
    exported = read_jsonl(tmp_path / "out.jsonl")
    assert [{k: v for k, v in e.items() if k not in ("id", "created")} for e in exported] == [
        {"tags": [], **line} for line in SAMPLE
    ]
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o077 == 0
    with PreferenceMemory.open(tmp_path / "other", "another passphrase") as other:
        assert other.import_jsonl(tmp_path / "out.jsonl") == len(SAMPLE)
        assert other.import_jsonl(tmp_path / "out.jsonl") == 0  # same ids: re-importing a backup adds nothing
        other.export_jsonl(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


GOOD = {"kind": "stated", "text": "fine"}


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"kind": "pair", "prompt": "p", "chosen": "c"', "not valid JSON"),
        ('["stated", "text"]', "expected a JSON object"),
        ('{"text": "no kind"}', "missing 'kind'"),
        ('{"kind": "opinion", "text": "x"}', "unknown kind"),
        ('{"kind": "pair", "prompt": "p", "chosen": "c"}', "needs 'rejected'"),
        ('{"kind": "stated", "text": "x", "txet": "typo"}', "unknown field"),
        ('{"kind": "rating", "prompt": "p", "response": "r", "score": 6}', "integer from 1 to 5"),
        ('{"kind": "rating", "prompt": "p", "response": "r", "score": true}', "integer from 1 to 5"),
        ('{"kind": "stated", "text": 42}', "must be a string"),
        ('{"kind": "stated", "text": "x", "tags": "one"}', "list of strings"),
        ('{"kind": "stated", "text": "\\ud800"}', "lone surrogate"),
        ('{"kind": "turn", "role": "narrator", "text": "x"}', "'role' must be one of"),
        ('{"kind": "stated", "text": "x", "created": "yesterday"}', "'created'"),
        ('{"kind": "stated", "text": "x", "id": "a"}', "appears twice"),
    ],
)
def test_malformed_jsonl_names_the_line_and_writes_nothing(
    memory: PreferenceMemory, tmp_path: Path, bad_line: str, reason: str
):
    memory.add_stated("already here")
    before = stored_bytes(memory.path.parent)
    path = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD, "id": "a"}, "", bad_line, GOOD])
    with pytest.raises(FedpalError) as err:
        memory.import_jsonl(path)
    assert "bad.jsonl:3: " in str(err.value) and reason in str(err.value)
    assert "\n" not in str(err.value)
    assert [r.fields["text"] for r in memory.records()] == ["already here"]
    assert stored_bytes(memory.path.parent) == before


def test_invalid_utf8_line_is_reported(memory: PreferenceMemory, tmp_path: Path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"kind": "stated", "text": "\xff\xfe"}\n')
    with pytest.raises(FedpalError, match=r"bin.jsonl:2: not UTF-8"):
        memory.import_jsonl(path)
    assert len(memory) == 0


@pytest.mark.parametrize(
    "call, reason",
    [
        (lambda m: m.add_rating("p", "r", 0), "1 to 5"),
        (lambda m: m.add_rating("p", "r", True), "1 to 5"),
        (lambda m: m.add_turn("robot", "x"), "role"),
        (lambda m: m.add_stated("\udcff"), "lone surrogate"),
        (lambda m: m.add_stated("x", tags=[""]), "empty"),
        (lambda m: m.add_stated("x", tags="style"), "list of strings"),
        (lambda m: m.add_pair("p", "c", None), "must be a string"),
    ],
)
def test_bad_records_are_refused(memory: PreferenceMemory, call, reason: str):
    with pytest.raises(FedpalError, match=reason):
        call(memory)
    assert len(memory) == 0


def test_forget_everything_destroys_the_key(home: Path):
    with PreferenceMemory.open(home, PASS) as mem:
        ids = [mem.add_stated(f"private {i}", tags=["t"]) for i in range(20)]
        with sqlite3.connect(home / "memory.sqlite") as conn:
            old_key = conn.execute("SELECT value FROM meta WHERE name = 'wrapped_key'").fetchone()[0]
        old_sealed = [_sealed(home, i) for i in ids]
        assert mem.forget(everything=True) == 20
        assert mem.records() == []
        new_id = mem.add_stated("after the purge")
    on_disk = db_bytes(home)
    assert bytes.fromhex(old_key) not in on_disk and old_key.encode() not in on_disk
    for sealed in old_sealed:
        assert sealed[:12] not in on_disk and sealed[-16:] not in on_disk  # neither nonce nor tag survives
    with PreferenceMemory.open(home, PASS) as mem:
        assert [r.id for r in mem.records()] == [new_id]
        with pytest.raises(FedpalError, match="no other criteria"):
            mem.forget(ids, everything=True)


def test_forget_by_id_time_range_and_tag(memory: PreferenceMemory, tmp_path: Path):
    lines = [
        {"kind": "stated", "text": f"r{t}", "created": t, "tags": ["even"] if t % 200 == 0 else ["odd"], "id": f"id{t}"}
        for t in (100, 200, 300, 400, 500, 600)
    ]
    memory.import_jsonl(write_jsonl(tmp_path / "t.jsonl", lines))

    def left() -> list[str]:
        return [r.fields["text"] for r in memory.records()]

    with pytest.raises(FedpalError, match="say what to forget"):
        memory.forget()
    gone = _sealed(memory.path.parent, "id100")
    assert gone in db_bytes(memory.path.parent)
    assert memory.forget(["id100", "missing"]) == 1
    assert gone[:12] not in db_bytes(memory.path.parent)  # secure_delete zeroed it; the WAL was truncated
    assert memory.forget(since=500) == 2
    assert left() == ["r200", "r300", "r400"]
    assert memory.forget(until=300, tag="odd") == 0
    assert memory.forget(since=200, until=400, tag="odd") == 1
    assert left() == ["r200", "r400"]
    assert memory.forget(tag="even") == 2
    assert left() == []


def test_retrieve_puts_stated_preferences_first_then_bm25_matches(memory: PreferenceMemory, tmp_path: Path):
    memory.import_jsonl(write_jsonl(tmp_path / "in.jsonl", SAMPLE))
    memory.add_pair("Best pasta recipe?", "Cacio e pepe.", "Ketchup noodles.")
    hits = memory.retrieve("rust borrow checker", k=4)
    assert [r.kind for r in hits] == ["stated", "stated", "pair"]  # unrelated records are not padding
    assert hits[2].fields["prompt"].startswith("How does the rust")
    assert memory.retrieve("metric units please", k=1)[0].fields["text"].startswith("Use metric")
    jokes = memory.retrieve("a joke about compilers", k=5, kinds=["rating"])
    assert [r.kind for r in jokes] == ["rating"] * 3 and jokes[0].fields["score"] == 5
    assert memory.retrieve("compilers", k=5, kinds="rating") == jokes[:1]
    assert memory.stated_preferences() == ["Use metric units, never imperial", "I prefer answers under fifty words"]
    assert memory.stated_preferences("words", k=1) == ["I prefer answers under fifty words"]
    with pytest.raises(FedpalError, match="unknown kind"):
        memory.retrieve("x", kinds=["opinion"])


def test_retrieval_sees_records_written_by_another_connection(home: Path):
    with PreferenceMemory.open(home, PASS) as reader, PreferenceMemory.open(home, PASS) as writer:
        assert reader.retrieve("lisbon") == []
        writer.add_turn("user", "trip to Lisbon")
        assert [r.fields["text"] for r in reader.retrieve("lisbon")] == ["trip to Lisbon"]


def test_training_views(memory: PreferenceMemory, tmp_path: Path):
    memory.import_jsonl(write_jsonl(tmp_path / "in.jsonl", SAMPLE))
    memory.add_rating("Tell me a joke", "Another 4-star joke", 4)  # ties with the knock-knock: no pair
    memory.add_pair("same", "x", "x")  # no preference in it
    ids = {r.fields.get("response"): r.id for r in memory.records("rating")}
    pairs = memory.preference_pairs()
    assert pairs[:2] == [
        PreferencePair(
            "How does the rust borrow checker work?",
            "Ownership rules checked at compile time.",
            "Rust is a reddish oxide of iron.",
            memory.records("pair")[0].id,
        ),
        PreferencePair(
            "Summarize the meeting",
            "Budget approved; launch in May.",
            "The meeting covered many long topics.",
            memory.records("edit")[0].id,
        ),
    ]
    from_ratings = {(p.chosen, p.rejected) for p in pairs[2:]}
    assert from_ratings == {
        ("A pun about compilers", "Why did the chicken cross?"),
        ("A knock-knock joke", "Why did the chicken cross?"),
        ("A pun about compilers", "A knock-knock joke"),
        ("Another 4-star joke", "Why did the chicken cross?"),
        ("A pun about compilers", "Another 4-star joke"),
    }
    assert (
        PreferencePair(
            "Tell me a joke",
            "A pun about compilers",
            "Why did the chicken cross?",
            f"{ids['A pun about compilers']}>{ids['Why did the chicken cross?']}",
        )
        in pairs
    )
    sft = {(e.prompt, e.response) for e in memory.sft_examples()}
    assert sft == {
        ("How does the rust borrow checker work?", "Ownership rules checked at compile time."),
        ("Tell me a joke", "A pun about compilers"),
        ("Tell me a joke", "A knock-knock joke"),
        ("Tell me a joke", "Another 4-star joke"),
        ("Summarize the meeting", "Budget approved; launch in May."),
        ("same", "x"),
    }
    assert all(isinstance(e, SFTExample) and e.source_id for e in memory.sft_examples())


def test_in_context_gives_each_prompt_the_preferences_generation_would_retrieve(memory: PreferenceMemory, tmp_path):
    from fedpal.common.generation import RETRIEVAL_HEADER, place_preferences

    bare = [PreferencePair("How far is it in miles?", "About 5 km.", "About 3 miles."), SFTExample("Hi", "Hello")]
    assert memory.in_context(bare) == bare  # nothing stated yet
    memory.import_jsonl(write_jsonl(tmp_path / "in.jsonl", SAMPLE))
    pair, example = memory.in_context(bare)
    stated = memory.stated_preferences(bare[0].prompt)
    assert (pair.prompt, pair.system) == place_preferences(bare[0].prompt, None, stated, "prompt")
    assert pair.prompt.startswith(bare[0].prompt + "\n\n") and "Use metric units" in pair.prompt and pair.system is None
    assert (pair.chosen, pair.rejected, pair.source_id) == (bare[0].chosen, bare[0].rejected, bare[0].source_id)
    assert isinstance(example, SFTExample) and example.response == "Hello" and example.prompt.startswith("Hi\n\n")
    pair, _ = memory.in_context(bare, "system")
    assert (
        pair.prompt == bare[0].prompt and pair.system.startswith(RETRIEVAL_HEADER) and "Use metric units" in pair.system
    )
    with pytest.raises(FedpalError, match="not 'footer'"):
        memory.in_context(bare, "footer")


def test_keyring_store_needs_no_passphrase_and_forget_all_replaces_its_key(home: Path, monkeypatch):
    import keyring
    from keyring.backend import KeyringBackend
    from keyring.compat import properties

    previous = keyring.get_keyring()

    class InMemoryKeyring(KeyringBackend):
        """A real keyring backend object, kept in memory; never chosen automatically."""

        entries: dict = {}

        @properties.classproperty
        def priority(cls):
            raise RuntimeError("test backend: install it explicitly")

        def set_password(self, service, username, password):
            self.entries[(service, username)] = password

        def get_password(self, service, username):
            return self.entries.get((service, username))

        def delete_password(self, service, username):
            self.entries.pop((service, username), None)

    backend = InMemoryKeyring()
    keyring.set_keyring(backend)
    try:
        monkeypatch.delenv("FEDPAL_PASSPHRASE", raising=False)
        with PreferenceMemory.open(home, use_keyring=True) as mem:
            mem.add_stated("kept by the keyring")
        assert PreferenceMemory.key_source(home) == "keyring"
        with PreferenceMemory.open(home) as mem:
            assert [r.fields["text"] for r in mem.records()] == ["kept by the keyring"]
            old_entries = dict(backend.entries)
            mem.forget(everything=True)
            assert len(backend.entries) == 1 and not set(backend.entries) & set(old_entries)
        backend.entries.clear()
        with pytest.raises(FedpalError, match="keyring has no key"):
            PreferenceMemory.open(home)
    finally:
        keyring.set_keyring(previous)
    with pytest.raises(FedpalError, match="no OS keyring"):
        PreferenceMemory.open(home.parent / "elsewhere", use_keyring=True)


WRITER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from fedpal.client.memory import PreferenceMemory
    home, name, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    def barrier(step):  # both processes reach `step` before either goes on
        Path(home, f"{name}.{step}").touch()
        deadline = time.monotonic() + 60
        while len(list(Path(home).glob(f"*.{step}"))) < 2:
            if time.monotonic() > deadline:
                sys.exit(f"{name}: the other writer never reached {step!r}")
            time.sleep(0.002)

    Path(home).mkdir(parents=True, exist_ok=True)
    barrier("ready")  # race to create the memory
    with PreferenceMemory.open(home, "pw") as mem:
        barrier("opened")  # then race to write
        if mode == "chat":
            for i in range(n):
                mem.add_turn("user", f"{name} turn {i}", tags=[name])
        else:
            for batch in range(0, n, 10):
                lines = [json.dumps({"kind": "stated", "text": f"{name} pref {i}", "tags": [name]})
                         for i in range(batch, min(n, batch + 10))]
                Path(home, name + ".jsonl").write_text("\\n".join(lines))
                mem.import_jsonl(Path(home, name + ".jsonl"))
""")


def _run_together(script: str, *argvs: list[str]) -> None:
    """Run ``script`` in one real process per argv at once; fail with their stderr, never hang."""
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *argv], stderr=subprocess.PIPE, text=True) for argv in argvs
    ]
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * len(procs), errors


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path):
    home = tmp_path / "shared-home"  # neither process finds a memory: they also race to create it
    n = 150
    _run_together(WRITER, [str(home), "chat", str(n), "chat"], [str(home), "importer", str(n), "import"])
    with PreferenceMemory.open(home, "pw") as mem:
        assert mem.verify() == []
        texts = {r.fields["text"] for r in mem.records()}
        assert len(mem) == 2 * n
    assert texts == {f"chat turn {i}" for i in range(n)} | {f"importer pref {i}" for i in range(n)}


field_text = st.one_of(
    st.text(),
    st.just(""),
    st.builds(lambda ch, n: ch * n, st.characters(exclude_categories=("Cs",)), st.integers(20_000, 100_000)),
)
lines = st.one_of(
    st.fixed_dictionaries({"kind": st.just("stated"), "text": field_text}),
    st.fixed_dictionaries(
        {"kind": st.just("pair"), "prompt": field_text, "chosen": field_text, "rejected": field_text}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("rating"), "prompt": field_text, "response": field_text, "score": st.integers(1, 5)}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("edit"), "prompt": field_text, "response": field_text, "edited": field_text}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("turn"), "role": st.sampled_from(["user", "assistant"]), "text": field_text}
    ),
).flatmap(
    lambda d: st.fixed_dictionaries(
        {**{k: st.just(v) for k, v in d.items()}, "tags": st.lists(st.text(min_size=1), max_size=3)}
    )
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(records=st.lists(lines, max_size=6), ensure_ascii=st.booleans())
def test_import_keeps_arbitrary_unicode_huge_and_empty_fields_exactly(records, ensure_ascii):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "in.jsonl")
        source.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
        with PreferenceMemory.open(Path(tmp, "home"), PASS, kdf=FAST_KDF) as mem:
            assert mem.import_jsonl(source) == len(records)
            stored = mem.records()
            mem.export_jsonl(Path(tmp, "out.jsonl"))
        out = read_jsonl(Path(tmp, "out.jsonl"))
    assert [{"kind": r.kind, **r.fields, "tags": r.tags} for r in stored] == records
    assert [{k: v for k, v in o.items() if k not in ("id", "created")} for o in out] == records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_import_of_arbitrary_bytes_either_succeeds_or_writes_nothing(junk):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "junk.jsonl")
        source.write_bytes(b'{"kind":"stated","text":"ok"}\n' + b"\n".join(junk))
        with PreferenceMemory.open(Path(tmp, "home"), PASS, kdf=FAST_KDF) as mem:
            try:
                added = mem.import_jsonl(source)
            except FedpalError as err:
                assert "junk.jsonl:" in str(err) and "\n" not in str(err)
                assert len(mem) == 0
            else:
                assert len(mem) == added >= 1


def test_bm25_scores_match_rank_bm25_and_limit_keeps_the_best():
    import random

    from rank_bm25 import BM25Plus

    from fedpal.client.retrieval import BM25Ranker, tokenize

    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(300)]
    index = BM25Ranker().index(docs)
    reference = BM25Plus([tokenize(d) for d in docs])
    for query in ("alpha", "beta beta gamma", "theta unknown"):
        hits = index.search(query)
        assert hits and all(set(tokenize(query)) & set(tokenize(docs[i])) for i, _ in hits)
        expected = reference.get_batch_scores(tokenize(query), [i for i, _ in hits])
        assert [s for _, s in hits] == pytest.approx(expected)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        for limit in (1, 4, 1000):
            assert index.search(query, limit=limit) == hits[:limit]
    assert index.search("omega") == [] and BM25Ranker().index([]).search("alpha") == []
    assert all(i in (1, 2, 3) for i, _ in index.search("alpha beta", candidates=[1, 2, 3]))


def test_another_ranker_can_be_plugged_in(home: Path):
    class LongestFirst:
        """Ranks by length, ignoring the query: enough to show retrieval goes through the protocol."""

        def index(self, documents):
            class Index:
                def search(self, query, candidates=None, limit=None):
                    pool = range(len(documents)) if candidates is None else candidates
                    return sorted(((i, float(len(documents[i]))) for i in pool), key=lambda h: -h[1])[:limit]

            return Index()

    with PreferenceMemory.open(home, PASS, ranker=LongestFirst()) as mem:
        mem.add_turn("user", "short")
        mem.add_turn("user", "a much longer turn")
        assert [r.fields["text"] for r in mem.retrieve("anything", k=2)] == ["a much longer turn", "short"]


CREATOR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedpal.client.memory import PreferenceMemory
    home, name = sys.argv[1], sys.argv[2]
    Path(home, name + ".ready").touch()
    deadline = time.monotonic() + 60
    while len(list(Path(home).glob("*.ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    with PreferenceMemory.open(home, "pw") as mem:
        mem.add_turn("user", name)
""")


def test_two_processes_creating_one_memory_both_succeed(tmp_path: Path):
    """Switching a new file to WAL needs an exclusive lock that SQLite does not wait for;
    before the retry, about one race in five failed with 'database is locked'."""
    for attempt in range(5):
        home = tmp_path / f"race{attempt}"
        home.mkdir()
        _run_together(CREATOR, [str(home), "agent"], [str(home), "importer"])
        with PreferenceMemory.open(home, "pw") as mem:
            assert sorted(r.fields["text"] for r in mem.records()) == ["agent", "importer"]
