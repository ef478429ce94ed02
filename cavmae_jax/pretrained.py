"""The officially released CAV-MAE checkpoints, and one way to name a model on the command line.

``MODEL`` arguments take a directory of ours (``cavmae train`` / ``cavmae convert`` output), an
official ``.pth`` file, or a name from ``RELEASES`` (downloaded once into ``weights_dir()``).
A ``.pth`` whose file name is a released one gets that release's settings (``norm_pix_loss``,
finetuning mode, sigmoid or softmax): they cannot be read from the tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.request
from pathlib import Path

from cavmae_jax import convert, paths
from cavmae_jax.errors import UserError

DROPBOX = "https://www.dropbox.com/s"


@dataclasses.dataclass(frozen=True)
class Release:
    """One released checkpoint. ``loss`` is how the classifier was trained: ``bce`` (AudioSet:
    sigmoid scores, mAP) or ``ce`` (VGGSound: softmax, accuracy)."""

    name: str
    file: str
    url: str
    model: str  # the paper's / official README's name of the model
    kind: str  # CAVMAE (with decoder) or CAVMAEFT (classifier)
    pretrain_data: str
    recipe: str  # our config that trains it
    reported: str = ""
    finetune_data: str | None = None
    label_dim: int | None = None
    mode: str | None = None
    loss: str | None = None
    norm_pix_loss: bool = True
    size: int | None = None  # bytes, where published
    sha256: str | None = None  # where published

    @property
    def finetuning(self) -> dict | None:
        return {"mode": self.mode, "loss": self.loss} if self.mode else None


def _release(name: str, url: str, **fields) -> Release:
    """A release from its Dropbox path (``<key>/<file>?dl=1``): the file name is the URL's."""
    file = url.rsplit("/", 1)[1].removesuffix("?dl=1")
    return Release(name=name, file=file, url=f"{DROPBOX}/{url}", **fields)


def _pretrained(name, url, model, recipe, pretrain_data="AudioSet-2M", **kw):
    return _release(
        name, url, model=model, kind="CAVMAE", pretrain_data=pretrain_data, recipe=recipe, **kw
    )


def _finetuned(name, url, model, data, mode, reported, recipe, pretrain="AudioSet-2M"):
    vgg = data.startswith("VGGSound")
    return _release(
        name,
        url,
        model=model,
        kind="CAVMAEFT",
        pretrain_data=pretrain,
        recipe=recipe,
        reported=reported,
        finetune_data=data,
        label_dim=309 if vgg else 527,
        mode=mode,
        loss="ce" if vgg else "bce",
    )


BASE = "pretrain:as-base"
AS_VGG = "AudioSet-2M + VGGSound"
RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        _pretrained(
            "cav-mae-scale++",
            "l5t5geufdy3qvnv/audio_model.21.pth?dl=1",
            "CAV-MAE-Scale++ (batch 256; recommended, init of every finetuning recipe)",
            "pretrain:as-scale++",
        ),
        _pretrained(
            "cav-mae-scale+",
            "xu8bfie6hz86oev/audio_model.25.pth?dl=1",
            "CAV-MAE-Scale+ (batch 108; the paper's CAV-MAE, used by the official retrieval)",
            "pretrain:as-scale+",
        ),
        _pretrained("cav-mae-base", "wxrjgr86gdhc5k8/cav-mae-base.pth?dl=1", "CAV-MAE-Base", BASE),
        _pretrained(
            "cav-mae-base-nonorm",
            "arrg7cb3e4hhjwu/cav-mae-base-nonorm.pth?dl=1",
            "CAV-MAE-Base-NoNorm (the official inpainting model)",
            f"{BASE} --config.model.norm_pix_loss=False",
            norm_pix_loss=False,
        ),
        _pretrained(
            "cav-mae-base-50", "dgorer0ybdbnvgf/50.pth?dl=1", "CAV-MAE-Base-50", "pretrain:mask-50"
        ),
        _pretrained(
            "cav-mae-base-65", "xmuyksqch6l6g87/65.pth?dl=1", "CAV-MAE-Base-65", "pretrain:mask-65"
        ),
        _pretrained(
            "cav-mae-base-85", "y3o9zggpecmrbnu/85.pth?dl=1", "CAV-MAE-Base-85", "pretrain:mask-85"
        ),
        _pretrained(
            "cav-mae-base-tf",
            "madv6ynuy5113zh/time_freq_75.pth?dl=1",
            "CAV-MAE-Base-TF",
            "pretrain:mask-tf",
        ),
        _pretrained(
            "cav-mae-base-tf-50",
            "nd7qlagn8je6zjn/time_freq_50.pth?dl=1",
            "CAV-MAE-Base-TF-50",
            "pretrain:mask-tf --config.mask_ratio_a=0.5 --config.mask_ratio_v=0.5",
        ),
        _pretrained(
            "cav-mae-base-t",
            "hfehd7m379ehr0y/time_75.pth?dl=1",
            "CAV-MAE-Base-T",
            "pretrain:mask-time",
        ),
        _pretrained(
            "cav-mae-base-f",
            "ad4fhzt6d3xre5p/freq_75.pth?dl=1",
            "CAV-MAE-Base-F",
            "pretrain:mask-freq",
        ),
        _pretrained(
            "cav-mae-base-c0.001",
            "4j4qyiyjcmbtc6u/cav-mae-base-c0.001.pth?dl=1",
            "CAV-MAE-Base-C0.001",
            f"{BASE} --config.model.contrast_loss_weight=0.001",
        ),
        _pretrained(
            "cav-mae-base-c0.1",
            "wf54ver9rs9fl1b/cav-mae-base-c0.1.pth?dl=1",
            "CAV-MAE-Base-C0.1",
            f"{BASE} --config.model.contrast_loss_weight=0.1",
        ),
        _pretrained(
            "cav-mae-scale+-single-direction",
            "mvhmg7eda410phr/single_direction.pth?dl=1",
            "CAV-MAE-Scale+ (batch 120, single-direction contrastive loss)",
            "pretrain:as-scale+",
        ),
        _pretrained(
            "cav-mae-symc-scale+",
            "ute6ydkw4hdv7rn/symc.pth?dl=1",
            "CAV-MAE-Symc-Scale+ (batch 120, bi-directional contrastive loss)",
            "pretrain:as-scale+ --config.model.bidirect_contrast=True",
        ),
        _pretrained(
            "in-initial",
            "9nlz523a5q52w86/ori_mae_11.pth?dl=1",
            "IN-initial: ImageNet MAE ViT-B mapped to CAV-MAE (init of pretraining from scratch)",
            "cavmae convert --mae-init (from the ImageNet MAE checkpoint)",
            pretrain_data="ImageNet (MAE)",
        ),
        _finetuned(
            "as2m-av-51.2",
            "hejj49zdgyyfsuh/as-full-51.2.pth?dl=1",
            "CAV-MAE-Scale+ finetuned",
            "AudioSet-2M",
            "multimodal",
            "51.2 mAP",
            "finetune:as2m",
        ),
        _finetuned(
            "as20k-av-42.0",
            "9x6y642so3zve5y/as-20k-42.0.pth?dl=1",
            "CAV-MAE-Scale+ finetuned",
            "AudioSet-20K",
            "multimodal",
            "42.0 mAP",
            "finetune:as20k",
        ),
        _finetuned(
            "vgg-av-65.5",
            "f4wrbxv2unewss9/vgg_65.5.pth?dl=1",
            "CAV-MAE-Scale+ finetuned",
            "VGGSound",
            "multimodal",
            "65.5% accuracy",
            "finetune:vgg",
        ),
        _finetuned(
            "vgg-av-65.9",
            "q66s3mu526mj2x6/vgg_66.0.pth?dl=1",
            "CAV-MAE-Scale+ with VGGSound pretraining, finetuned",
            "VGGSound",
            "multimodal",
            "65.9% accuracy",
            "finetune:vgg (init: pretrain:vgg-from-as)",
            AS_VGG,
        ),
        _finetuned(
            "as2m-audio-46.6",
            "itfw7p0ueq7z9og/as_46.6.pth?dl=1",
            "CAV-MAE-Scale+ finetuned on audio",
            "AudioSet-2M (audio)",
            "audioonly",
            "46.6 mAP",
            "finetune:as2m-audioonly",
        ),
        _finetuned(
            "as20k-audio-37.7",
            "pariabyh1iyayda/as_37.7.pth?dl=1",
            "CAV-MAE-Scale+ finetuned on audio",
            "AudioSet-20K (audio)",
            "audioonly",
            "37.7 mAP",
            "finetune:as20k-audioonly",
        ),
        _finetuned(
            "as20k-visual-20.0",
            "9ngkq9ygwqecxz5/as_20.0.pth?dl=1",
            "CAV-MAE-Scale++ finetuned on frames",
            "AudioSet-20K (visual)",
            "videoonly",
            "20.0 mAP",
            "finetune:as20k-videoonly",
        ),
        _finetuned(
            "vgg-audio-59.8",
            "l4rj0sgpnt08bp2/vgg_59.8.pth?dl=1",
            "CAV-MAE-Scale+ with VGGSound pretraining, finetuned on audio",
            "VGGSound (audio)",
            "audioonly",
            "59.8% accuracy",
            "finetune:vgg --config.mode=audioonly",
            AS_VGG,
        ),
    )
}
BY_FILE = {r.file: r for r in RELEASES.values()}


@dataclasses.dataclass
class Loaded:
    """A model and how to run it as a classifier (``finetuning``: ``{"mode", "loss"}`` or None)."""

    model: object
    finetuning: dict | None
    source: str
    fbank_norm: tuple[float, float] | None = None  # as trained here; None: AudioSet's

    def classifier_settings(
        self, mode: str | None = None, loss: str | None = None, flag: str = "--metric"
    ):
        """``(mode, loss)`` to run the classifier with: as given, else as it was trained (the
        mode else multimodal). How the scores are formed (sigmoid for a BCE-trained classifier,
        softmax for cross-entropy) is never guessed: a classifier that does not record it
        needs ``flag``."""
        known = self.finetuning or {}
        loss = loss or known.get("loss")
        if loss is None:
            raise UserError(
                f"{self.source}: a classifier that does not record how it was trained; pass "
                f"{flag} (sigmoid scores and mAP for AudioSet's BCE-trained classifiers, "
                "softmax and accuracy for VGGSound's)"
            )
        return mode or known.get("mode", "multimodal"), loss


def weights_dir() -> Path:
    """Where released checkpoints are kept: ``$CAVMAE_WEIGHTS`` or ``~/.cache/cavmae_jax``."""
    default = Path.home() / ".cache" / "cavmae_jax"
    return Path(os.environ.get("CAVMAE_WEIGHTS", default))


def _check(release: Release, path: Path) -> None:
    if release.size is not None and path.stat().st_size != release.size:
        raise UserError(f"{path}: {path.stat().st_size} bytes, {release.name} has {release.size}")
    if release.sha256 is not None:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != release.sha256:
            raise UserError(f"{path}: sha256 {digest} is not {release.name}'s {release.sha256}")


def download(release: Release, directory: Path | None = None) -> Path:
    """The release's ``.pth`` in ``directory`` (default ``weights_dir()``), fetched once with a
    progress bar into a temporary file and renamed when complete."""
    from tqdm import tqdm

    directory = directory or weights_dir()
    target = directory / release.file
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(release.url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with (
                    partial.open("wb") as out,
                    tqdm(total=total, unit="B", unit_scale=True, desc=release.file) as bar,
                ):
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as err:
            raise UserError(
                f"{release.name}: cannot download {release.url} ({err}); download it by hand "
                f"and pass the file: cavmae convert {directory / release.file} OUT"
            ) from err
        partial.rename(target)
    _check(release, target)
    return target


def release_of(path: paths.PathLike) -> Release | None:
    """The release a ``.pth`` file is, by its file name."""
    return BY_FILE.get(paths.path(path).name)


def load_pth(path: paths.PathLike, **overrides) -> Loaded:
    """An official ``.pth``; a released file gets its release's settings (overridable)."""
    release = release_of(path)
    if release:
        overrides = {"norm_pix_loss": release.norm_pix_loss, **overrides}
    model = convert.model_from_pth(path, **overrides)
    return Loaded(model, release.finetuning if release else None, str(path))


def load(spec: str, **overrides) -> Loaded:
    """A model directory of ours, an official ``.pth``, or a release name (downloaded if absent)."""
    if spec in RELEASES:
        return load_pth(download(RELEASES[spec]), **overrides)
    path = paths.path(spec)
    if path.is_dir():
        info = convert.model_info(path)
        norm = tuple(info["fbank_norm"]) if "fbank_norm" in info else None
        return Loaded(convert.load_model(path), info.get("finetuning"), spec, norm)
    if path.is_file():
        return load_pth(path, **overrides)
    raise UserError(
        f"model {spec}: no such directory or file, and not a released model name "
        "(cavmae convert --list shows them)"
    )
