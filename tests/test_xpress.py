"""Plain LZ77 XPRESS: test encoder against every decoder backend, and corrupt-input behaviour.

Ground truth: the original bytes (round trips), the [MS-XCA] worked example (hand-derived
vector), libfwnt as an independent implementation (cross-check of the test encoder), and
expected stream sizes that prove each length-encoding branch is really exercised.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tests.fixtures.xpress_compress import compress
from vm2core.errors import FormatError
from vm2core.reader import xpress
from vm2core.reader.xpress import XpressBackendError, XpressError

BACKENDS = xpress.available_backends()
PAGE = 4096


def _text(rng: random.Random, size: int) -> bytes:
    """Text-like data: words from a small vocabulary, so it compresses but not trivially."""
    vocab = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
             for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(vocab) + rng.choice([b" ", b"\n", b"(", b", ", b"\0\0\0\0"])
    return bytes(out[:size])


def _run(length: int) -> bytes:
    """Two literals then one match of exactly `length` (offset 1)."""
    return b"Q" + b"x" * (length + 1)


def _corpus() -> dict[str, bytes]:
    rng = random.Random(20240501)
    small_alphabet = bytes(rng.choice(b"ACGT") for _ in range(PAGE))
    far = rng.randbytes(8192)
    cases = {
        "empty": b"",
        "one_byte": b"a",
        "two_bytes": b"ab",
        "zero_page": bytes(PAGE),
        "ff_page": b"\xff" * PAGE,
        "random_page": rng.randbytes(PAGE),
        "text_page": _text(rng, PAGE),
        "text_then_zeros": _text(rng, 1500).ljust(PAGE, b"\0"),
        "small_alphabet_page": small_alphabet,  # many minimum-length matches
        "period_2": b"ab" * (PAGE // 2),
        "period_3": b"abc" * 1365 + b"a",
        "period_7": b"0123456" * 585 + b"0",
        "words_64k": _text(rng, 65536),
        "zeros_64k": bytes(65536),
        "random_64k": rng.randbytes(65536),
        "mixed_64k": b"".join(rng.choice([bytes(PAGE), _text(rng, PAGE), rng.randbytes(PAGE)])
                              for _ in range(16)),
        "offset_8192": far + far[:300],  # match at the largest offset
        "offset_8193": far + b"!" + far[:300],  # just outside the window
        "two_long_matches": b"Q" + b"x" * 21 + b"R" + b"y" * 21,  # shared nibble byte
        "three_long_matches": b"Q" + b"x" * 21 + b"R" + b"y" * 40 + b"S" + b"z" * 500,
    }
    for length in [*range(3, 30), 100, 278, 279, 280, 281, 1000, 32771, 65537, 65538, 65539, 70000]:
        cases[f"match_{length}"] = _run(length)
    return cases


CORPUS = _corpus()
COMPRESSED = {name: compress(data) for name, data in CORPUS.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CORPUS))
def test_round_trip_every_backend(backend: str, name: str) -> None:
    decoded = xpress.get_decompressor(backend)(COMPRESSED[name], len(CORPUS[name]))
    assert decoded == CORPUS[name]


@pytest.mark.parametrize("name", list(CORPUS))
def test_backends_agree_and_default_matches(name: str) -> None:
    outputs = {b: xpress.get_decompressor(b)(COMPRESSED[name], len(CORPUS[name])) for b in BACKENDS}
    assert len(set(outputs.values())) == 1, outputs.keys()
    assert xpress.decompress(COMPRESSED[name], len(CORPUS[name])) == CORPUS[name]


def test_memoryview_input() -> None:
    data = CORPUS["text_page"]
    for backend in BACKENDS:
        assert xpress.get_decompressor(backend)(memoryview(COMPRESSED["text_page"]), PAGE) == data


def _expected_run_size(length: int) -> int:
    """Stream size for _run(length): flag word, 2 literals, match token, then the length extension."""
    size = 4 + 2 + 2
    if length >= 10:
        size += 1  # nibble byte (first long match owns a new one)
    if length >= 25:
        size += 1  # byte
    if length >= 280:
        size += 2  # u16 holding length - 3
    if length > 65538:
        size += 4  # u16 zero escape then u32 holding length - 3
    return size


@pytest.mark.parametrize("length", [3, 9, 10, 24, 25, 279, 280, 65538, 65539, 70000])
def test_length_branches_are_encoded_as_specified(length: int) -> None:
    assert len(compress(_run(length))) == _expected_run_size(length)


def test_shared_nibble_byte() -> None:
    # Two matches of length 20: the second one's nibble goes into the first one's byte.
    assert len(COMPRESSED["two_long_matches"]) == 4 + 4 + 2 * 2 + 1
    # Third long match opens a new nibble byte; the length 499 also needs byte + u16.
    assert len(COMPRESSED["three_long_matches"]) == 4 + 6 + 3 * 2 + 1 + 1 + (1 + 1 + 2)


def test_spec_worked_example() -> None:
    """Hand-derived from [MS-XCA] 2.3: "abc" * 100 -> 3 literals, one match (offset 3, length 297)."""
    stream = bytes.fromhex("ffffff1f61626317000fff2601")
    assert compress(b"abc" * 100) == stream
    for backend in BACKENDS:
        assert xpress.get_decompressor(backend)(stream, 300) == b"abc" * 100


def test_literals_only_stream() -> None:
    """26 literals: flag word has 26 zero bits, the 6 unused bits set to 1 (end marker)."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz"
    stream = bytes.fromhex("3f000000") + alphabet
    assert compress(alphabet) == stream
    for backend in BACKENDS:
        assert xpress.get_decompressor(backend)(stream, 26) == alphabet


@pytest.mark.parametrize("name", ["zero_page", "ff_page", "text_page", "text_then_zeros",
                                  "small_alphabet_page", "period_3", "words_64k", "zeros_64k"])
def test_compressible_input_is_compressed(name: str) -> None:
    assert len(COMPRESSED[name]) < 0.9 * len(CORPUS[name])


def test_window_is_8_kib() -> None:
    """A repeat 8192 bytes back is one match; 8193 bytes back it must be literals."""
    assert len(COMPRESSED["offset_8193"]) - len(COMPRESSED["offset_8192"]) > 250


def test_incompressible_input_expands_by_flag_words_only() -> None:
    data = CORPUS["random_page"]
    # Random data has few 3-byte repeats; at worst 1/8 expansion plus a flag word.
    assert len(COMPRESSED["random_page"]) <= len(data) + len(data) // 8 + 4


def test_compressor_speed_is_usable() -> None:
    import time

    start = time.perf_counter()
    for _ in range(10):
        compress(CORPUS["text_page"])
    assert (time.perf_counter() - start) / 10 < 0.05  # a page in well under 50 ms


try:
    import pyfwnt
except ImportError:
    pyfwnt = None


@pytest.mark.skipif(pyfwnt is None, reason="libfwnt-python (pyfwnt) not installed")
@pytest.mark.parametrize("name", [n for n in CORPUS
                                  if n not in {"empty", "one_byte", "zeros_64k", "mixed_64k"}
                                  and not (n.startswith("match_") and int(n[6:]) > 32771)])
def test_independent_libfwnt_decodes_the_test_encoder(name: str) -> None:
    """Cross-check against libfwnt itself (not our wrapper, which may fall back to pure).

    Excluded: inputs shorter than 2 stream bytes' worth (libfwnt refuses tiny streams) and
    matches longer than 32771 bytes, which libfwnt does not support.
    """
    assert pyfwnt is not None
    assert pyfwnt.lzxpress_decompress(COMPRESSED[name], len(CORPUS[name])) == CORPUS[name]


def test_pyfwnt_backend_handles_matches_longer_than_libfwnt_supports() -> None:
    if "pyfwnt" not in BACKENDS:
        pytest.skip("libfwnt-python (pyfwnt) not installed")
    decode = xpress.get_decompressor("pyfwnt")
    for name in ["zeros_64k", "match_65537", "match_65538", "match_65539", "match_70000"]:
        assert decode(COMPRESSED[name], len(CORPUS[name])) == CORPUS[name]


@pytest.mark.skipif(sys.platform != "win32",
                    reason="ntdll backend needs Windows (ntdll!RtlDecompressBufferEx)")
def test_ntdll_backend_available_on_windows() -> None:
    assert "ntdll" in BACKENDS
    decode = xpress.get_decompressor("ntdll")
    for name in ["text_page", "words_64k", "match_70000", "two_long_matches"]:
        assert decode(COMPRESSED[name], len(CORPUS[name])) == CORPUS[name]


# ---- corrupt and truncated input -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["text_page", "small_alphabet_page", "two_long_matches",
                                  "three_long_matches", "match_280", "match_70000", "random_page"])
def test_every_truncation_raises_or_is_complete(backend: str, name: str) -> None:
    decode = xpress.get_decompressor(backend)
    stream, original = COMPRESSED[name], CORPUS[name]
    for cut in range(len(stream)):
        try:
            result = decode(stream[:cut], len(original))
        except XpressError:
            continue
        # Only dropping the final, symbol-less flag word can leave a complete stream.
        assert result == original and cut >= len(stream) - 4, cut


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_streams_raise_or_keep_the_size(backend: str) -> None:
    decode = xpress.get_decompressor(backend)
    rng = random.Random(7)
    stream = COMPRESSED["text_page"]
    raised = 0
    for _ in range(300):
        damaged = bytearray(stream)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            result = decode(bytes(damaged), PAGE)
        except XpressError:
            raised += 1
            continue
        assert len(result) == PAGE
    assert raised > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_raises_or_keeps_the_size(backend: str) -> None:
    decode = xpress.get_decompressor(backend)
    rng = random.Random(11)
    for size in [0, 1, 2, 3, 4, 5, 7, 100, 2000, 5000]:
        for _ in range(20):
            try:
                result = decode(rng.randbytes(size), PAGE)
            except XpressError:
                continue
            assert len(result) == PAGE


def _stream(flag_word: int, body: bytes) -> bytes:
    return flag_word.to_bytes(4, "little") + body


INVALID = {
    # First symbol is a match: nothing to copy from yet.
    "offset_before_start": (_stream(0xFFFFFFFF, (0 << 3 | 0).to_bytes(2, "little")), 3),
    # Literal 'a' then a match of 9 bytes, but only 5 bytes of output are wanted.
    "match_past_out_size": (_stream(0x7FFFFFFF, b"a" + (0 << 3 | 6).to_bytes(2, "little")), 5),
    # Literal 'a', then a match of offset 2 at output 1.
    "offset_just_too_far": (_stream(0x7FFFFFFF, b"a" + (1 << 3 | 0).to_bytes(2, "little")), 4),
    # Stream ends (end marker) before out_size bytes exist.
    "ends_early": (_stream(0x3FFFFFFF, b"ab"), 3),
    # Flag word itself cut short.
    "short_flag_word": (b"\x00\x00", 1),
    # Literal flag but no literal byte.
    "missing_literal": (_stream(0x00000000, b""), 1),
    # Match token cut after one byte.
    "half_token": (_stream(0x7FFFFFFF, b"a\x00"), 5),
    # Long match whose nibble byte is missing.
    "missing_nibble": (_stream(0x7FFFFFFF, b"a" + (0 << 3 | 7).to_bytes(2, "little")), 20),
    # Long match whose extension byte is missing.
    "missing_length_byte": (_stream(0x7FFFFFFF, b"a" + (0 << 3 | 7).to_bytes(2, "little") + b"\x0f"), 40),
    # u16 escape cut short.
    "missing_u16": (_stream(0x7FFFFFFF, b"a" + (0 << 3 | 7).to_bytes(2, "little") + b"\x0f\xff\x01"), 400),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_streams_raise(backend: str, case: str) -> None:
    stream, out_size = INVALID[case]
    with pytest.raises(XpressError):
        xpress.get_decompressor(backend)(stream, out_size)


def test_pure_rejects_u16_length_below_spec_minimum() -> None:
    """[MS-XCA] 2.4.4: a u16/u32 length below 15 + 7 is an error (libfwnt does not check this)."""
    body = b"a" + (0 << 3 | 7).to_bytes(2, "little") + b"\x0f\xff" + (21).to_bytes(2, "little")
    with pytest.raises(XpressError, match="below"):
        xpress.decompress_pure(_stream(0x7FFFFFFF, body), 25)


def test_pure_rejects_huge_u32_length_without_allocating() -> None:
    token = (0 << 3 | 7).to_bytes(2, "little")
    body = b"a" + token + b"\x0f\xff\x00\x00" + (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(XpressError, match="overruns"):
        xpress.decompress_pure(_stream(0x7FFFFFFF, body), PAGE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_size_is_validated(backend: str) -> None:
    decode = xpress.get_decompressor(backend)
    for bad in [-1, xpress.MAX_OUT_SIZE + 1]:
        with pytest.raises(XpressError):
            decode(COMPRESSED["text_page"], bad)
    assert decode(COMPRESSED["text_page"], 0) == b""


@pytest.mark.parametrize("backend", BACKENDS)
def test_trailing_data_after_full_output_is_ignored(backend: str) -> None:
    """Decoders stop once out_size bytes exist (like Windows and libfwnt)."""
    stream = COMPRESSED["text_page"] + b"\x00\x00\x00\x00trailing garbage"
    assert xpress.get_decompressor(backend)(stream, PAGE) == CORPUS["text_page"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_stops_inside_a_literal_run(backend: str) -> None:
    alphabet = b"abcdefghijklmnopqrstuvwxyz"
    assert xpress.get_decompressor(backend)(bytes.fromhex("3f000000") + alphabet, 10) == alphabet[:10]


def test_xpress_error_is_a_format_error() -> None:
    assert issubclass(XpressError, FormatError)


# ---- backend selection ------------------------------------------------------------------------

def test_backend_selection_api() -> None:
    assert xpress.BACKEND in BACKENDS
    assert BACKENDS[-1] == "pure"
    with pytest.raises(XpressBackendError):
        xpress.get_decompressor("lznt1")
    if sys.platform != "win32":
        assert "ntdll" not in BACKENDS
        with pytest.raises(XpressBackendError, match="not available"):
            xpress.get_decompressor("ntdll")


def _backend_in_subprocess(value: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VM2CORE_XPRESS=value)
    return subprocess.run([sys.executable, "-c", "from vm2core.reader import xpress; print(xpress.BACKEND)"],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_var_forces_backend(backend: str) -> None:
    result = _backend_in_subprocess(backend)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == backend


def test_env_var_with_unavailable_backend_fails_on_use_not_on_import() -> None:
    """A bad VM2CORE_XPRESS must not break the import (``vm2core --help`` imports everything); the
    error comes from check_backend() and from any decode, never a silent fall-back to another backend."""
    code = ("from vm2core.reader import xpress\n"
            "for call in (xpress.check_backend, lambda: xpress.decompress(b'', 0)):\n"
            "    try:\n"
            "        call()\n"
            "    except xpress.XpressBackendError as e:\n"
            "        print(e.exit_code, e)\n")
    env = dict(os.environ, VM2CORE_XPRESS="nonsense")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("2 VM2CORE_XPRESS=nonsense: unknown") for line in lines), lines
