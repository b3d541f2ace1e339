"""Omniglot (Lake et al., 2015) read from the official release on disk, as folders or zips."""

from __future__ import annotations

import io
import operator
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .tasks import _check_int

__all__ = ["Omniglot"]

_Source = Path | bytes  # a PNG file on disk, or the bytes of a zip member
_Characters = list[tuple[tuple[str, str], list[_Source]]]  # ((alphabet, character), images), sorted
_LAYOUT = "<alphabet>/<character>/*.png"


def _import_pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "`Omniglot` needs Pillow to decode its PNG images: `pip install Pillow` (or `pip install metann[dev]`)."
        ) from err
    return Image


def _scan_folder(base: Path) -> _Characters:
    """Every character folder ``base/<alphabet>/<character>`` that holds PNG files, sorted by name."""
    found: _Characters = []
    for alphabet in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name):
        for character in sorted((p for p in alphabet.iterdir() if p.is_dir()), key=lambda p: p.name):
            files = sorted((p for p in character.iterdir() if p.suffix.lower() == ".png"), key=lambda p: p.name)
            if files:
                found.append(((alphabet.name, character.name), list(files)))
    return found


def _scan_zip(path: Path, folder: str) -> _Characters:
    """The same from a zip holding ``folder/<alphabet>/<character>/*.png``; the PNG bytes are read into memory."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid zip file; expected the official Omniglot `{path.name}`.") from err
    with archive:
        groups: dict[tuple[str, str], list[str]] = {}
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[0] == folder and all(parts[1:]) and parts[3].lower().endswith(".png"):
                groups.setdefault((parts[1], parts[2]), []).append(name)
        return [(key, [archive.read(name) for name in sorted(groups[key])]) for key in sorted(groups)]


def _find(root: Path, folder: str) -> tuple[Path, _Characters]:
    """Locate ``root/folder`` (preferred) or ``root/folder.zip`` and list its characters."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"Omniglot root {str(root)!r} is not a directory. Expected a folder holding `{folder}/` "
            f"or `{folder}.zip` from the official release (github.com/brendenlake/omniglot)."
        )
    directory, archive = root / folder, root / f"{folder}.zip"
    if directory.is_dir():
        where, found = directory, _scan_folder(directory)
    elif archive.is_file():
        where, found = archive, _scan_zip(archive, folder)
    else:
        raise FileNotFoundError(
            f"found neither the folder {str(directory)!r} nor the zip {str(archive)!r}. Expected the official "
            f"Omniglot `{folder}` extracted as `{folder}/{_LAYOUT}`, or the zip `{folder}.zip` holding it."
        )
    if not found:
        inside = f"`{folder}/{_LAYOUT}` inside the zip" if where == archive else f"`{_LAYOUT}` in it"
        raise FileNotFoundError(f"no PNG images found in {str(where)!r}: expected {inside}.")
    return where, found


class Omniglot:
    """The Omniglot handwritten characters, read from the official release on disk.

    ``root`` must hold ``images_background`` (``background=True``: 964 characters
    of 30 alphabets) or ``images_evaluation`` (``background=False``: 659 characters
    of 20 alphabets), either extracted as ``<folder>/<alphabet>/<character>/*.png``
    or as the official zip ``<folder>.zip`` holding that tree (an extracted folder
    is preferred when both exist). Nothing is downloaded. A zip's PNG files are read
    into memory at construction; folders are read image by image.

    Each character is one class: characters sorted by ``(alphabet, character)``
    names get the labels ``0..C-1``, and images are ordered by label, then by file
    name. ``ds[i]`` returns ``(image, label)``: the PNG decoded to grey levels,
    resized to ``image_size`` x ``image_size`` (Pillow's antialiased bilinear
    resize) and **inverted**, so strokes are 1.0 on a 0.0 background (the PNGs are
    black strokes on white), as a ``(1, image_size, image_size)`` tensor, then
    passed through ``transform`` if given.

    With ``rotations=True`` every image also appears rotated by 90, 180 and 270
    degrees (counter-clockwise, :func:`torch.rot90`), each rotation of a character
    a new class: rotation ``r`` (0 to 3) of character ``c`` has label ``r * C + c``
    and the image ``j`` has the index ``r * n + j``, where ``n`` is the number of
    files. ``label % C`` is the character in both cases.

    Args:
        root: Folder holding ``images_background``/``images_evaluation`` or their zips.
        background: Read the background set (``True``) or the evaluation set.
        image_size: Side of the returned images; ``None`` keeps the original 105.
        rotations: Add the rotated copies as new classes (four times the classes).
        transform: Callable applied to each image tensor before it is returned.
        dtype: Floating-point dtype of the images.

    Attributes:
        labels: ``(len(ds),)`` int64 tensor of the labels, without decoding images.
        num_classes: Number of classes (characters, times 4 with ``rotations``).
        characters: ``(alphabet, character)`` names of the labels ``0..C-1``.

    Raises:
        FileNotFoundError: If ``root``, or both the folder and the zip, are missing,
            or they hold no PNG image.
        ImportError: If Pillow is not installed.
        ValueError: If the zip is not a valid zip file or ``image_size < 1``.
        TypeError: If ``transform`` is not callable or ``dtype`` not a floating dtype.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for character in ("character01", "character02"):
        ...     folder = root / "images_background" / "Latin" / character
        ...     folder.mkdir(parents=True)
        ...     for k in range(3):
        ...         Image.new("L", (105, 105), 255).save(folder / f"{k}.png")
        >>> ds = Omniglot(root, rotations=True)
        >>> len(ds), ds.num_classes, ds.labels.tolist()[:7]
        (24, 8, [0, 0, 0, 1, 1, 1, 2])
        >>> image, label = ds[0]
        >>> image.shape, float(image.max()), label
        (torch.Size([1, 28, 28]), 0.0, 0)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        background: bool = True,
        *,
        image_size: int | None = 28,
        rotations: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        _import_pil()
        self.image_size = None if image_size is None else _check_int("image_size", image_size, 1)
        if transform is not None and not callable(transform):
            raise TypeError(f"`transform` must be callable or None, got `{type(transform).__name__}`.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating-point `torch.dtype`, got {dtype!r}.")
        self.root = Path(root)
        self.background = bool(background)
        self.rotations = bool(rotations)
        self.transform = transform
        self.dtype = dtype
        folder = "images_background" if self.background else "images_evaluation"
        self.source, found = _find(self.root, folder)
        self.characters = [key for key, _ in found]
        self._files = [file for _, files in found for file in files]
        character = torch.tensor([c for c, (_, files) in enumerate(found) for _ in files], dtype=torch.long)
        copies = 4 if self.rotations else 1
        self.num_classes = copies * len(found)
        self.labels = torch.cat([character + r * len(found) for r in range(copies)])

    def __len__(self) -> int:
        """Number of images (times 4 with ``rotations``)."""
        return len(self.labels)

    def _decode(self, source: _Source) -> Tensor:
        image_module = _import_pil()
        with image_module.open(source if isinstance(source, Path) else io.BytesIO(source)) as png:
            grey = png.convert("L")
        size = self.image_size
        if size is not None and grey.size != (size, size):
            grey = grey.resize((size, size), resample=getattr(image_module, "Resampling", image_module).BILINEAR)
        pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(1, grey.height, grey.width)
        return 1 - pixels.to(self.dtype) / 255

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(image, label)`` for one image (decoded from disk each time).

        Raises:
            IndexError: If ``index`` is out of range.
        """
        index, size = operator.index(index), len(self)
        if not -size <= index < size:
            raise IndexError(f"`Omniglot` index {index} is out of range for {size} images.")
        index %= size
        rotation, file = divmod(index, len(self._files))
        image = self._decode(self._files[file])
        if rotation:
            image = torch.rot90(image, rotation, dims=(1, 2)).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, background={self.background}, "
            f"image_size={self.image_size}, rotations={self.rotations}, images={len(self)}, "
            f"classes={self.num_classes})"
        )
