"""Regenerates the imaging test fixtures: small images in many encodings, and what PIL makes of them.

Reference side: Debian 12 python3-pil 9.4.0 (libjpeg-turbo 2.1.5) and cjpeg from libjpeg-turbo-progs; the golden data's
Pillow decodes the golden JPEGs to the same bytes. Run from this folder: python3 make_fixtures.py
Writes <name> (the encoded file) and <name>.rgb.npy (PIL's Image.open(name).convert("RGB"), uint8 [H, W, 3]), plus
resize_source.npy and resize_<w>x<h>.npy (PIL's Image.resize((w, h), Image.BICUBIC) of resize_source).
"""
import struct
import subprocess
import zlib

import numpy as np
from PIL import Image

rng = np.random.default_rng(20240901)


def pattern(w, h):
    """Gradients plus noise: smooth enough for realistic JPEG coefficients, noisy enough to expose upsampling."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 13) % 256], -1)
    return np.clip(base + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8)


def save_reference(name):
    np.save(name + ".rgb.npy", np.array(Image.open(name).convert("RGB")))


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(name, samples, color_type):
    """16-bit PNG (PIL cannot write these for RGB/LA): samples uint16 [H, W, channels]."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(name, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


# JPEG: every chroma layout libjpeg-turbo upsamples differently, progressive and restart intervals, grey, Adobe RGB,
# 16-bit quantisation tables (very low quality), and sizes that are not multiples of the MCU.
Image.fromarray(pattern(21, 13)).save("source.ppm")
jpegs = {
    "h2v2_progressive_restart.jpg": "-quality 85 -sample 2x2 -progressive -restart 2B",
    "h2v1.jpg": "-quality 90 -sample 2x1",
    "h1v2.jpg": "-quality 90 -sample 1x2",
    "h4v1.jpg": "-quality 90 -sample 4x1",
    "h1v1_restart.jpg": "-quality 95 -sample 1x1 -restart 1B",
    "grey_progressive.jpg": "-quality 80 -grayscale -progressive",
    "adobe_rgb.jpg": "-quality 90 -rgb",
    "quality2_16bit_tables.jpg": "-quality 2 -sample 2x2",
}
for name, options in jpegs.items():
    subprocess.run(f"cjpeg {options} -outfile {name} source.ppm", shell=True, check=True)
    save_reference(name)

# Progressive refinement scans only carry end-of-band runs and correction bits on images with many busy blocks.
Image.fromarray(pattern(96, 64)).save("source.ppm")
subprocess.run("cjpeg -quality 92 -sample 2x2 -progressive -outfile progressive_96x64.jpg source.ppm", shell=True, check=True)
save_reference("progressive_96x64.jpg")

# PNG: 16-bit grey (PIL "I;16": clamps to 255), 16-bit RGB and grey+alpha (high byte), palette with tRNS, RGBA.
grey16 = rng.integers(0, 600, (9, 11, 1)).astype(np.uint16)
grey16[0, :4, 0] = [0, 255, 256, 65535]
write_png16("grey16.png", grey16, 0)
write_png16("rgb16.png", rng.integers(0, 65536, (9, 11, 3)).astype(np.uint16), 2)
write_png16("grey_alpha16.png", rng.integers(0, 65536, (9, 11, 2)).astype(np.uint16), 4)
palette_image = Image.fromarray(pattern(11, 9)).convert("P", palette=Image.ADAPTIVE, colors=16)
palette_image.save("palette_trns.png", transparency=bytes(range(0, 255, 16)))
Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)).save("rgba.png")
for name in ("grey16.png", "rgb16.png", "grey_alpha16.png", "palette_trns.png", "rgba.png"):
    save_reference(name)

# GIF: first frames smaller than the logical screen. PIL fills the rest with palette entry 0, or with the transparent
# entry when there is one, and shows transparent pixels as that entry's colour.
def write_subframe_gif(name, transparency):
    frame = Image.fromarray(pattern(10, 8)).convert("P", palette=Image.ADAPTIVE, colors=32)
    if transparency is None:
        frame.save("gif_frame.tmp.gif")
    else:
        frame.save("gif_frame.tmp.gif", transparency=transparency)
    data = bytearray(open("gif_frame.tmp.gif", "rb").read())
    data[6:10] = struct.pack("<HH", 16, 12)  # enlarge the logical screen
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[position] == 0x21:
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    data[position + 1:position + 5] = struct.pack("<HH", 3, 2)  # move the frame inside it
    open(name, "wb").write(bytes(data))
    save_reference(name)


write_subframe_gif("transparent_subframe.gif", 7)
write_subframe_gif("opaque_subframe.gif", None)

# BMP with alpha, 16-bit grey TIFF, lossy WebP with alpha.
Image.fromarray(rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)).save("rgba32.bmp")
Image.fromarray(rng.integers(0, 700, (6, 8)).astype(np.uint16), "I;16").save("grey16.tif")
Image.fromarray(np.dstack([pattern(16, 12), rng.integers(0, 256, (12, 16, 1), dtype=np.uint8)]), "RGBA").save("lossy_alpha.webp", quality=70)
for name in ("rgba32.bmp", "grey16.tif", "lossy_alpha.webp"):
    save_reference(name)

# Resize: one pass only (either axis), strong up- and down-scaling, 1x1, and values that overshoot and clip.
source = pattern(29, 17)
source[::3, ::2] = 255
source[1::3, 1::2] = 0
np.save("resize_source.npy", source)
for w, h in [(29, 40), (64, 17), (7, 5), (1, 1), (203, 3), (2, 119), (30, 16)]:
    np.save(f"resize_{w}x{h}.npy", np.array(Image.fromarray(source).resize((w, h), Image.BICUBIC)))

for temporary in ("source.ppm", "gif_frame.tmp.gif"):
    import os
    os.remove(temporary)
