"""Detection datasets (VOC, COCO, YOLO-txt), the offline DigitScenes dataset and batch collation.

Every reader yields ``(image, target)`` pairs in the format fixed by docs/design.md.
"""

from gcp.detection.data.coco import COCODataset
from gcp.detection.data.common import (
    CorruptFileError,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    batch_to,
    collate,
)
from gcp.detection.data.digits import make_digit_scenes
from gcp.detection.data.transforms import letterbox
from gcp.detection.data.voc import VOC_CLASSES, VOCDataset
from gcp.detection.data.yolo import DataYaml, YOLODataset, read_data_yaml

__all__ = [
    "COCODataset",
    "CorruptFileError",
    "DataYaml",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "VOCDataset",
    "VOC_CLASSES",
    "YOLODataset",
    "batch_to",
    "collate",
    "letterbox",
    "make_digit_scenes",
    "read_data_yaml",
]
