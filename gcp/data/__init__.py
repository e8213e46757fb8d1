"""Detection datasets (VOC, COCO, YOLO-txt), the offline DigitScenes dataset and batch collation.

Every reader yields ``(image, target)`` pairs in the format fixed by docs/design.md.
"""

from gcp.data.coco import COCODataset
from gcp.data.common import CorruptFileError, DatasetError, DetectionDataset, ImageRecord, collate
from gcp.data.digits import make_digit_scenes
from gcp.data.transforms import letterbox
from gcp.data.voc import VOC_CLASSES, VOCDataset
from gcp.data.yolo import YOLODataset

__all__ = [
    "COCODataset",
    "CorruptFileError",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "VOCDataset",
    "VOC_CLASSES",
    "YOLODataset",
    "collate",
    "letterbox",
    "make_digit_scenes",
]
