#!/usr/bin/env python3
"""Writes the small odd images the dataset tests read (needs Pillow):
an EXIF-rotated JPEG, a CMYK JPEG, a 16-bit grayscale PNG, an RGBA PNG with transparency,
and a truncated (corrupt) JPEG.  Run from this folder: python3 make_images.py"""
from PIL import Image

# 32x16 stored, left half red, right half blue; EXIF orientation 6 = rotate 90 degrees clockwise
# to display: displayed 16x32, top half red, bottom half blue.
im = Image.new("RGB", (32, 16), (0, 0, 255))
im.paste((255, 0, 0), (0, 0, 16, 16))
exif = Image.Exif()
exif[0x0112] = 6
im.save("exif-rotate-90.jpg", quality=95, exif=exif.tobytes())

# CMYK red (0% cyan, 100% magenta, 100% yellow, 0% black)
Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save("cmyk-red.jpg", quality=95)

# 16-bit grayscale: a left-to-right ramp
g = Image.new("I;16", (16, 16))
g.putdata([x * 4000 for y in range(16) for x in range(16)])
g.save("gray16.png")

# RGBA: left half opaque green, right half fully transparent (black underneath)
a = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
a.paste((0, 255, 0, 255), (0, 0, 8, 16))
a.save("rgba.png")

# A JPEG cut short
with open("exif-rotate-90.jpg", "rb") as f:
    data = f.read()
with open("corrupt.jpg", "wb") as f:
    f.write(data[: len(data) // 3])
