"""The official inpainting figure: a clip's spectrogram and frame, masked, and as the pretrained
model reconstructs them (original / masked / reconstructed), with the masked-patch losses.

As the official inpainting, masking is unstructured unless chosen, frame 5 is shown, and the
reconstruction keeps the visible patches: ``x * (1 - mask) + prediction * mask``. A model
pretrained with ``norm_pix_loss`` predicts each patch standardised; its prediction is put back
on the original patch's mean and spread (the usual MAE display; the official figure uses the
model trained without it, ``cav-mae-base-nonorm``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cavmae_jax import clip_inputs, paths
from cavmae_jax.errors import UserError
from cavmae_jax.inference import EVAL_FRAME
from cavmae_jax.models import masking
from cavmae_jax.models.layers import patchify, unpatchify
from input_pipeline.video import IMAGENET_MEAN, IMAGENET_STD


def _destandardise(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Undo the per-patch standardisation of norm_pix_loss (unbiased variance, eps 1e-6)."""
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    return pred * np.sqrt(var + 1e-6) + mean


def inpaint(
    model,
    audio: np.ndarray,
    image: np.ndarray,
    mask_ratio_a: float,
    mask_ratio_v: float,
    mask_mode: str = "unstructured",
    seed: int = 2,
) -> dict[str, np.ndarray]:
    """Original, masked and reconstructed fbank [T, F] and image [H, W, 3] (both normalised
    model inputs), the masks and the two masked-patch losses of one clip."""
    if type(model).__name__ != "CAVMAE" or not model.cfg.decoder_depth:
        raise UserError("reconstruct needs a pretrained model with its decoder (CAVMAE)")
    cfg = model.cfg
    key_a, key_v = jax.random.split(jax.random.key(seed))
    noise_a = masking.audio_noise(key_a, 1, cfg.audio_grid, mask_ratio_a, mask_mode)
    noise_v = jax.random.uniform(key_v, (1, cfg.visual_grid[0] * cfg.visual_grid[1]))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, audio, image):
        out = nnx.merge(graphdef, state)(
            audio,
            image,
            noise_a=noise_a,
            noise_v=noise_v,
            mask_ratio_a=mask_ratio_a,
            mask_ratio_v=mask_ratio_v,
        )
        return {
            k: out[k] for k in ("pred_a", "pred_v", "mask_a", "mask_v", "loss_mae_a", "loss_mae_v")
        }

    out = jax.device_get(forward(state, audio[None], image[None]))
    p = cfg.patch_size
    spectrogram = audio.T[None, :, :, None]  # [1, F, T, 1]: frequency rows, as the model sees it
    views = {}
    for name, stream, x, grid, chans in (
        ("audio", "a", spectrogram, cfg.audio_grid, 1),
        ("image", "v", image[None], cfg.visual_grid, cfg.in_chans),
    ):
        target = np.asarray(patchify(x, p))
        pred = np.asarray(out[f"pred_{stream}"], np.float32)
        if cfg.norm_pix_loss:
            pred = _destandardise(pred, target)
        mask = np.asarray(out[f"mask_{stream}"], np.float32)[..., None]
        masked = target * (1 - mask)
        rebuilt = masked + pred * mask
        for view, patches in (("original", target), ("masked", masked), ("reconstructed", rebuilt)):
            views[f"{name}_{view}"] = np.asarray(unpatchify(patches, grid, p, chans))[0]
        views[f"{name}_mask"] = mask[0, :, 0]
    for name in ("audio_original", "audio_masked", "audio_reconstructed"):
        views[name] = views[name][..., 0]  # [F, T]
    views["loss_mae_a"], views["loss_mae_v"] = float(out["loss_mae_a"]), float(out["loss_mae_v"])
    return views


def _picture(normalised: np.ndarray) -> np.ndarray:
    return np.clip((normalised * IMAGENET_STD + IMAGENET_MEAN) * 255, 0, 255).astype(np.uint8)


def figure(views: dict, title: str):
    """Two rows (spectrogram, frame) of original / masked / reconstructed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 7))
    axes = fig.subplots(2, 3, gridspec_kw={"height_ratios": [1, 2.2]})
    low = views["audio_original"].min()
    high = views["audio_original"].max()
    for column, view in enumerate(("original", "masked", "reconstructed")):
        spec = views[f"audio_{view}"]
        ax = axes[0, column]
        ax.imshow(
            spec,
            origin="lower",
            aspect="auto",
            cmap="magma",
            vmin=low,
            vmax=high,
            extent=(0, spec.shape[1] / 100, 0, spec.shape[0]),
        )
        ax.set_title(f"spectrogram, {view}")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("mel bin")
        ax = axes[1, column]
        ax.imshow(_picture(views[f"image_{view}"]))
        ax.set_title(f"frame {EVAL_FRAME}, {view}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reconstruct(
    model,
    video: str,
    output,
    mask_ratio_a: float = 0.75,
    mask_ratio_v: float = 0.75,
    mask_mode: str = "unstructured",
    seed: int = 2,
) -> dict:
    """Write the figure of one clip (a video file) to ``output``; returns the two MAE losses."""
    example = clip_inputs.read_video(video)
    if example is None:
        raise UserError(f"{video}: cannot be read (see the line above)")
    views = inpaint(
        model,
        example["audio"],
        example["frames"][EVAL_FRAME],
        mask_ratio_a,
        mask_ratio_v,
        mask_mode,
        seed,
    )
    title = (
        f"{paths.path(video).name}: {mask_mode} masking, audio {mask_ratio_a:.0%}, visual "
        f"{mask_ratio_v:.0%}; masked-patch MSE audio {views['loss_mae_a']:.3f}, "
        f"visual {views['loss_mae_v']:.3f}"
    )
    paths.save_figure(figure(views, title), output)
    return {"loss_mae_a": views["loss_mae_a"], "loss_mae_v": views["loss_mae_v"]}
