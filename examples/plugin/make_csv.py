"""Write digits.csv beside the example recipe: scikit-learn's 8x8 digits, pixels 0..1."""

import csv
from pathlib import Path

from sklearn.datasets import load_digits

images, labels = load_digits(return_X_y=True)
path = Path(__file__).with_name("digits.csv")
with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([f"p{i}" for i in range(64)] + ["label"])
    for image, label in zip(images, labels, strict=True):
        writer.writerow([f"{v / 16:.4f}" for v in image] + [int(label)])
print(f"wrote {path} ({len(labels)} rows)")
