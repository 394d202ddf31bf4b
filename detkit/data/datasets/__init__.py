"""Data set formats (COCO, VOC, YOLO, synthetic), one module each, and their shared base: fills DATASETS."""
