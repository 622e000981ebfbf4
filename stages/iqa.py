"""BRISQUE no-reference image quality with the trained model that ships in the `brisque` pip package.

BRISQUE (Mittal, Moorthy and Bovik, "No-Reference Image Quality Assessment in the Spatial Domain", IEEE
TIP 2012) fits generalized Gaussian distributions to mean-subtracted, contrast-normalized (MSCN) luma
coefficients and to their products with the four neighbours (horizontal, vertical and both diagonals), at
the image's size and at half size (36 features), and maps the features to a score with an epsilon-SVR
trained on human opinion scores. About 0 is pristine, higher is worse; typical natural images score 0-100
(the SVR can leave that range).

Why not call `brisque.BRISQUE.score`: in brisque 0.2.0 it fails under NumPy 2 (`TypeError: only
0-dimensional arrays can be converted to Python scalars`, its variance estimates are 1-element arrays),
it runs its 2-D convolutions with `scipy.signal.convolve2d` (slow), computes the full-size MSCN map twice,
and importing it pulls in scikit-image and requests (about 1.3 s). This module computes the same
features the way that package does (so its trained SVR and feature ranges apply): BT.709 luma in [0, 1]
as `skimage.color.rgb2gray` gives it, a 7x7 Gaussian window with sigma 7/6 and zero padding, C = 1/255,
the moment-matching AGGD fit, and a bicubic half-size second scale. Two small deliberate differences:
the separable window runs in OpenCV, and the shape parameter alpha is read off a fine table by linear
interpolation (the original MATLAB code's grid search, 0.2..10) instead of `scipy.optimize.root`,
and MSCN values within 1e-6 of zero are set to 0. In perfectly flat areas (synthetic graphics, clipped
highlights) the MSCN coefficients are +-1e-13 rounding noise, and the fit's left/right split (x < 0 vs.
x >= 0, which counts those samples) follows that noise, so the package's scores there depend on
floating-point details; ours put all of them on the non-negative side, reproducibly.
`tests/test_quality.py` checks the scores against the package's own code path on textured images.

Only the model files (`svm.txt`, `normalize.pickle`: feature minima/maxima as plain lists) are taken from
the package; they are located without importing it. The model is loaded once per `Brisque` object.
Not done here: any video-specific (temporal) quality, and any choice of which frames or size to score
(the quality stage does that).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pickle
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

_WINDOW = 7  # MSCN window side, as in the package and the paper
_SIGMA = 7 / 6  # MSCN window Gaussian sigma
_C = 1 / 255  # MSCN stabilising constant for luma in [0, 1]
_RGB2GRAY = np.array([0.2125, 0.7154, 0.0721])  # skimage.color.rgb2gray weights (BT.709)
_N_FEATURES = 36
_ZERO = 1e-6  # |MSCN| below this is rounding noise (one luma level gives 1e-3 or more)


def brisque_model_dir() -> Path:
    """Folder of the `brisque` package's trained model, found without importing the package.

    Raises ImportError (with the pip line) when the package is not installed, FileNotFoundError when
    its model files are missing.
    """
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the BRISQUE score needs the `brisque` package's trained model: "
                          "pip install 'brisque==0.2.0' (or disable it with quality: {brisque: false})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    for name in ("svm.txt", "normalize.pickle"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} missing; reinstall the model with "
                                    f"pip install --force-reinstall 'brisque==0.2.0'")
    return folder


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(v) for v in np.ravel(x)]).reshape(np.shape(x))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numbers only: any class or function reference is refused, so a
    tampered model file cannot run code (no pickle of untrusted data)."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model file (plain data only)")


class Brisque:
    """Scores RGB images with BRISQUE; loads the SVR model and feature ranges once, in the constructor.

    Args:
        model_dir: folder holding `svm.txt` (libsvm epsilon-SVR) and `normalize.pickle` (dict of
            `min_`/`max_` lists, 36 each); default: the one inside the installed `brisque` package.

    `score(image)` returns a float, or NaN for an image without usable texture statistics (flat, e.g. a
    black frame, or smaller than 16 x 16). It does not resize the image: BRISQUE depends on scale, so
    callers pick the size.
    """

    def __init__(self, model_dir: str | Path | None = None) -> None:
        try:
            from libsvm import svmutil  # noqa: PLC0415 - heavy-ish import, only when BRISQUE is wanted
        except ImportError as exc:
            raise ImportError("the BRISQUE score needs libsvm: pip install libsvm-official "
                              "(or disable it with quality: {brisque: false})") from exc
        folder = Path(model_dir) if model_dir is not None else brisque_model_dir()
        self._svm = svmutil
        self._model = svmutil.svm_load_model(str(folder / "svm.txt"))
        if not self._model:
            raise ValueError(f"libsvm could not read {folder / 'svm.txt'}")
        with open(folder / "normalize.pickle", "rb") as f:
            ranges = _PlainUnpickler(f).load()
        if not isinstance(ranges, dict) or {"min_", "max_"} - set(ranges):
            raise ValueError(f"{folder / 'normalize.pickle'}: expected a dict with 'min_' and 'max_'")
        self._min = np.asarray(ranges["min_"], dtype=np.float64)
        self._max = np.asarray(ranges["max_"], dtype=np.float64)
        if self._min.shape != (_N_FEATURES,) or self._max.shape != (_N_FEATURES,):
            raise ValueError(f"{folder / 'normalize.pickle'}: expected {_N_FEATURES} feature ranges, "
                             f"got {self._min.shape} and {self._max.shape}")
        g = cv2.getGaussianKernel(_WINDOW, _SIGMA, cv2.CV_64F)
        self._kernel = g / g.sum()  # 1-D factor of the package's normalized 7x7 Gaussian
        alphas = np.arange(0.2, 10.0 + 1e-9, 0.001)
        phi = np.exp(2 * _lgamma(2 / alphas) - _lgamma(1 / alphas) - _lgamma(3 / alphas))
        self._alpha_table = (phi, alphas)  # phi rises monotonically with alpha
        log.debug("BRISQUE model loaded from %s", folder)

    # ------------------------------------------------------------------------------------ features

    def _mscn(self, gray: np.ndarray) -> np.ndarray:
        k = self._kernel
        mu = cv2.sepFilter2D(gray, cv2.CV_64F, k, k, borderType=cv2.BORDER_CONSTANT)
        mu2 = cv2.sepFilter2D(gray * gray, cv2.CV_64F, k, k, borderType=cv2.BORDER_CONSTANT)
        sigma = np.sqrt(np.abs(mu * mu - mu2))
        mscn = (gray - mu) / (sigma + _C)
        mscn[np.abs(mscn) < _ZERO] = 0.0  # flat areas: the sign there is rounding noise
        return mscn

    def _aggd(self, x: np.ndarray) -> tuple[float, float, float, float] | None:
        """(alpha, mean, left variance, right variance) of an asymmetric generalized Gaussian fit."""
        x = x.ravel()
        n_neg = int(np.count_nonzero(x < 0))
        n_pos = x.size - n_neg
        if n_neg == 0 or n_pos == 0:
            return None
        left = np.minimum(x, 0.0)  # the negative part, 0 elsewhere
        sum_sq, sum_neg = float(np.dot(x, x)), float(np.dot(left, left))
        var_l, var_r = sum_neg / n_neg, (sum_sq - sum_neg) / n_pos
        mean_sq = sum_sq / x.size
        if var_l <= 0 or var_r <= 0 or mean_sq <= 0:
            return None
        gamma = math.sqrt(var_l) / math.sqrt(var_r)
        mean_abs = (float(x.sum()) - 2 * float(left.sum())) / x.size
        r_hat = mean_abs ** 2 / mean_sq
        big_r = r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
        phi, alphas = self._alpha_table
        alpha = float(np.interp(big_r, phi, alphas))
        const = math.exp(0.5 * (math.lgamma(1 / alpha) - math.lgamma(3 / alpha)))
        mean = (math.sqrt(var_r) - math.sqrt(var_l)) * const * math.exp(math.lgamma(2 / alpha) - math.lgamma(1 / alpha))
        return alpha, mean, var_l, var_r

    def _scale_features(self, gray: np.ndarray) -> list[float] | None:
        m = self._mscn(gray)
        pairs = (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:])
        fit = self._aggd(m)
        if fit is None:
            return None
        alpha, _, var_l, var_r = fit
        out = [alpha, (var_l + var_r) / 2]
        for p in pairs:
            fit = self._aggd(p)
            if fit is None:
                return None
            out += list(fit)
        return out

    def features(self, image: np.ndarray) -> np.ndarray | None:
        """The 36 raw BRISQUE features of an RGB uint8 image (h, w, 3), or None when degenerate."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image (h, w, 3), got shape {image.shape}")
        if min(image.shape[:2]) < 16:
            return None
        gray = cv2.transform(image.astype(np.float64), (_RGB2GRAY / 255.0)[None, :]).reshape(image.shape[:2])
        full = self._scale_features(gray)
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        small = self._scale_features(half) if full is not None else None
        if small is None:
            return None
        return np.asarray(full + small, dtype=np.float64)

    # ------------------------------------------------------------------------------------ score

    def score(self, image: np.ndarray) -> float:
        """BRISQUE score of one RGB uint8 image (lower = better); NaN when it has no usable statistics."""
        feats = self.features(image)
        if feats is None or not np.all(np.isfinite(feats)):
            return float("nan")
        scaled = -1 + 2.0 * (feats - self._min) / (self._max - self._min)
        nodes, _ = self._svm.gen_svm_nodearray([float(v) for v in scaled], isKernel=False)
        return float(self._svm.libsvm.svm_predict(self._model, nodes))
