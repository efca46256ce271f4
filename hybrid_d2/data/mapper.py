"""A DatasetMapper whose unreadable images give an error naming the file and the record."""

from typing import Any, Dict

from detectron2.data import DatasetMapper as _D2DatasetMapper
from detectron2.utils.file_io import PathManager

__all__ = ["DatasetMapper", "ImageReadError"]


class ImageReadError(RuntimeError):
    """An image of a dataset record is missing, empty, truncated or corrupt."""


def _is_empty(file_name: str) -> bool:
    with PathManager.open(file_name, "rb") as f:
        return f.read(1) == b""


def _describe_unreadable(dataset_dict: Dict[str, Any], error: BaseException) -> str:
    file_name = dataset_dict["file_name"]
    if not PathManager.exists(file_name):
        problem = "does not exist"
    elif PathManager.isfile(file_name) and _is_empty(file_name):
        problem = "is empty (0 bytes)"
    else:
        problem = (
            f"cannot be decoded: corrupt or truncated ({type(error).__name__}: {error})"
        )
    image_id = dataset_dict.get("image_id")
    message = f"Image {file_name} of dataset record image_id={image_id} {problem}."
    if "sem_seg_file_name" in dataset_dict:
        message += f" The record also reads {dataset_dict['sem_seg_file_name']}."
    return message


class DatasetMapper(_D2DatasetMapper):
    """
    Detectron2's :class:`detectron2.data.DatasetMapper` (same config and behaviour), except
    that an unreadable image raises :class:`ImageReadError` naming the file and the record's
    image_id, with the original error chained, instead of a bare PIL error in a data worker.

    Detectron2 reads the image inside ``DatasetMapper.__call__`` and offers no way to pass an
    image read beforehand. Reading it twice (e.g. a PIL ``verify()`` pass) would cost I/O and
    still miss truncated JPEGs, and copying ``__call__`` would fork Detectron2's logic. So the
    parent call is wrapped instead: its only file I/O is reading the image (and the optional
    semantic segmentation file), and PIL reports missing, empty, corrupt and truncated files
    as ``OSError`` (``FileNotFoundError``, ``UnidentifiedImageError``) or ``SyntaxError``.
    Images whose corrupt bytes still decode cannot be detected without a checksum pass.
    """

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as error:
            raise ImageReadError(_describe_unreadable(dataset_dict, error)) from error
