"""The normalised frame: every registration runs on copies of the images whose spacing and origin are scaled by
``k = 1 / geometric_mean(fixed spacing)``, so that a fixed voxel measures about one unit. Learning rates, gradient
tolerances, smoothing sigmas and control-point spacings then mean the same thing whatever the data's unit (0.1 mm or
10 mm voxels); lengths given in mm are converted with the same ``k``. The result is mapped back,
``T(p) = T_k(k p) / k``, which is exact for every transform kind used here.

Also the linear state carried from stage to stage, and composition of transforms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk


def frame_scale(image: sitk.Image) -> float:
    """``k`` such that the image's voxels measure about one unit once spacing is multiplied by ``k``."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    return float(1.0 / np.exp(np.mean(np.log(spacing))))


def _tidy(value: float) -> float:
    """``value`` to 12 significant digits: 0.1 mm voxels scaled by 10 measure exactly 1, not 0.9999999999999999,
    so that the same voxels give the same registration whatever their spacing (ITK's grid arithmetic is exact on
    round numbers; a last-bit difference moved a displacement field's result by 10 %)."""
    return float(f"{value:.12g}")


def scale_image(image: sitk.Image, k: float) -> sitk.Image:
    """A copy of the voxels with spacing and origin multiplied by ``k`` (physical p -> k p)."""
    if k == 1.0:
        return image
    out = sitk.Image(image)
    out.SetSpacing(tuple(_tidy(s * k) for s in image.GetSpacing()))
    out.SetOrigin(tuple(_tidy(o * k) for o in image.GetOrigin()))
    return out


_TYPED = {
    "Euler2DTransform": sitk.Euler2DTransform,
    "Euler3DTransform": sitk.Euler3DTransform,
    "Similarity2DTransform": sitk.Similarity2DTransform,
    "Similarity3DTransform": sitk.Similarity3DTransform,
    "AffineTransform": sitk.AffineTransform,
    "VersorRigid3DTransform": sitk.VersorRigid3DTransform,
    "ScaleSkewVersor3DTransform": sitk.ScaleSkewVersor3DTransform,
}


def copy_typed(tx: sitk.Transform) -> sitk.Transform:
    return _TYPED[tx.GetName()](tx)


def unscale_transform(tx: sitk.Transform, k: float) -> sitk.Transform:
    """Map a transform found in the frame scaled by ``k`` back: ``T(p) = T_k(k p) / k``."""
    if k == 1.0:
        return tx
    inv = 1.0 / k
    tx = tx.Downcast()
    name = tx.GetName()
    if name == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        out = sitk.CompositeTransform(tx.GetDimension())
        for i in range(comp.GetNumberOfTransforms()):
            out.AddTransform(unscale_transform(comp.GetNthTransform(i), k))
        return out
    if name == "TranslationTransform":
        t = sitk.TranslationTransform(tx)
        return sitk.TranslationTransform(t.GetDimension(), tuple(c * inv for c in t.GetOffset()))
    if name == "BSplineTransform":
        b = sitk.BSplineTransform(tx)
        out = sitk.BSplineTransform(b.GetDimension(), b.GetOrder())
        out.SetTransformDomainOrigin(tuple(c * inv for c in b.GetTransformDomainOrigin()))
        out.SetTransformDomainPhysicalDimensions(tuple(c * inv for c in b.GetTransformDomainPhysicalDimensions()))
        out.SetTransformDomainDirection(b.GetTransformDomainDirection())
        out.SetTransformDomainMeshSize(b.GetTransformDomainMeshSize())
        out.SetParameters(tuple(c * inv for c in b.GetParameters()))
        return out
    if name == "DisplacementFieldTransform":
        d = sitk.DisplacementFieldTransform(tx)
        field = d.GetDisplacementField()
        arr = sitk.GetArrayFromImage(field) * inv
        out_field = sitk.GetImageFromArray(arr, isVector=True)
        out_field.SetSpacing(tuple(s * inv for s in field.GetSpacing()))
        out_field.SetOrigin(tuple(o * inv for o in field.GetOrigin()))
        out_field.SetDirection(field.GetDirection())
        return sitk.DisplacementFieldTransform(sitk.Cast(out_field, sitk.sitkVectorFloat64))
    # Every other kind here is a MatrixOffsetTransformBase: matrix unchanged, centre and translation scaled.
    out = copy_typed(tx)
    out.SetCenter(tuple(c * inv for c in out.GetCenter()))
    out.SetTranslation(tuple(c * inv for c in out.GetTranslation()))
    return out


def compose(transforms: list[sitk.Transform]) -> sitk.Transform:
    """One transform applying the last of ``transforms`` first (ITK's composite order)."""
    if len(transforms) == 1:
        return transforms[0]
    comp = sitk.CompositeTransform(transforms[0].GetDimension())
    for tx in transforms:
        comp.AddTransform(tx)
    return comp


def all_parameters(tx: sitk.Transform) -> np.ndarray:
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        parts = [all_parameters(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(tx.GetParameters(), dtype=float)


@dataclass
class Linear:
    """One (matrix, centre, translation) carried from stage to stage, whatever the linear kind."""

    matrix: np.ndarray
    center: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls, dim: int, center) -> Linear:
        return cls(np.eye(dim), np.asarray(center, float), np.zeros(dim))

    @classmethod
    def of(cls, tx: sitk.Transform) -> Linear:
        dim = tx.GetDimension()
        if tx.GetName() == "TranslationTransform":
            return cls(np.eye(dim), np.zeros(dim), np.asarray(sitk.TranslationTransform(tx).GetOffset()))
        typed = copy_typed(tx)
        return cls(
            np.asarray(typed.GetMatrix()).reshape(dim, dim),
            np.asarray(typed.GetCenter()),
            np.asarray(typed.GetTranslation()),
        )

    def as_kind(self, kind: str) -> sitk.Transform:
        """The transform of ``kind`` equal to this state (exact: kinds only gain freedom along the stages)."""
        dim = len(self.center)
        if kind == "translation":
            # x -> A(x - c) + c + t with A = I is x + t
            return sitk.TranslationTransform(
                dim, tuple(self.translation + (self.matrix - np.eye(dim)) @ (-self.center))
            )
        tx: sitk.Transform
        if kind == "rigid":
            tx = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
        elif kind == "similarity":
            tx = sitk.Similarity2DTransform() if dim == 2 else sitk.Similarity3DTransform()
        elif kind == "affine":
            tx = sitk.AffineTransform(dim)
        else:
            raise ValueError(kind)
        tx.SetCenter(tuple(self.center))
        if not np.allclose(self.matrix, np.eye(dim)):
            tx.SetMatrix(tuple(self.matrix.ravel()))
        tx.SetTranslation(tuple(self.translation))
        return tx

    def as_affine(self) -> sitk.AffineTransform:
        return sitk.AffineTransform(tuple(self.matrix.ravel()), tuple(self.translation), tuple(self.center))


#: Points per axis of the lattice over the fixed image on which ``Frame.overlap`` is measured (by dimension): a few
#: hundred points, milliseconds per level.
OVERLAP_LATTICE = {2: 24, 3: 10}
#: A level that ends with less than this share of the overlap the registration started from has diverged: the
#: optimizer stepped the images apart (a rigid stage ended at 6878 mm TRE on a 182 mm brain, another went on through
#: its deformable stage at 316 mm). No registration that works loses nine tenths of its overlap.
NO_OVERLAP_SHARE = 0.1


class Frame:
    """A pair in the normalised frame, with landmarks for per-level TRE and its prepared pyramid levels."""

    def __init__(self, pair: Any):
        from .pyramid import LevelImages  # (the script concatenates the engine's modules: no import cycle there)

        self.k = frame_scale(pair.fixed)
        self.fixed = scale_image(pair.fixed, self.k)
        self.moving = scale_image(pair.moving, self.k)
        self.fixed_mask = scale_image(pair.fixed_mask, self.k) if pair.fixed_mask is not None else None
        self.moving_mask = scale_image(pair.moving_mask, self.k) if pair.moving_mask is not None else None
        self.fixed_points = pair.fixed_points * self.k if pair.fixed_points is not None else None
        self.moving_points = pair.moving_points * self.k if pair.moving_points is not None else None
        self.dim = pair.fixed.GetDimension()
        self.levels = LevelImages(self)

    def tre_mean(self, tx: sitk.Transform) -> float | None:
        """Mean TRE in physical units of the original data for a transform of the normalised frame."""
        if self.fixed_points is None:
            return None
        mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in self.fixed_points])
        return float(np.mean(np.linalg.norm(mapped - self.moving_points, axis=1)) / self.k)

    @functools.cached_property
    def lattice(self) -> np.ndarray:
        """Points spread over the fixed image (inside its mask, where the mask holds enough of them), physical."""
        n = OVERLAP_LATTICE.get(self.dim, 8)
        size = np.asarray(self.fixed.GetSize(), dtype=float)
        axes = [(np.arange(n) + 0.5) / n * s - 0.5 for s in size]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, self.dim)
        if self.fixed_mask is not None:
            voxels = np.clip(np.rint(grid).astype(int), 0, size.astype(int) - 1)
            inside = sitk.GetArrayViewFromImage(self.fixed_mask)[tuple(voxels[:, ::-1].T)] > 0
            if inside.sum() >= n:
                grid = grid[inside]
        return np.array([self.fixed.TransformContinuousIndexToPhysicalPoint(tuple(map(float, c))) for c in grid])

    def overlap(self, tx: sitk.Transform) -> float:
        """The share of ``lattice`` that ``tx`` (of the normalised frame) maps inside the moving image's voxels."""
        mapped = np.array([tx.TransformPoint(tuple(point)) for point in self.lattice])
        m = self.moving
        to_index = np.linalg.inv(np.asarray(m.GetDirection()).reshape(self.dim, self.dim) * np.asarray(m.GetSpacing()))
        index = (mapped - np.asarray(m.GetOrigin())) @ to_index.T
        top = np.asarray(m.GetSize(), dtype=float) - 0.5
        return float(np.mean(np.all((index >= -0.5) & (index <= top), axis=1)))

    def center(self) -> np.ndarray:
        return np.asarray(
            self.fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in self.fixed.GetSize()])
        )


@functools.lru_cache(maxsize=8)
def _cached_frame(pair: Any) -> Frame:
    return Frame(pair)


def frame_of(pair: Any) -> Frame:
    """The pair's frame, kept per process for the pairs a worker registers again and again (their images in the
    normalised frame are made once); a pair that cannot be a cache key (the standalone script's) gets a fresh one."""
    try:
        hash(pair)
    except TypeError:
        return Frame(pair)
    return _cached_frame(pair)
