"""Machine-readable 'this is synthetic' labels written into the encoded file.

IPTC Photo Metadata 2025.1: Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia (an edit of a user's
image: compositeWithTrainedAlgorithmicMedia), plus the AI system used and its version. PNG
also carries the generation parameters as text chunks: ours (JSON) and AUTOMATIC1111's ``parameters`` text, which
PNG-info tools read.
"""

from __future__ import annotations

import io
import json
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, PngImagePlugin

from imagegen.a1111 import display_name

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
PARAMETERS_KEY = "imagegen:parameters"
A1111_PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's PNG-info chunk
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def xmp_packet(system: str, version: str, source_type: str = DIGITAL_SOURCE_TYPE) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        f"<Iptc4xmpExt:DigitalSourceType>{source_type}</Iptc4xmpExt:DigitalSourceType>"
        f"<Iptc4xmpExt:AISystemUsed>{escape(system)}</Iptc4xmpExt:AISystemUsed>"
        f"<Iptc4xmpExt:AISystemVersionUsed>{escape(version)}</Iptc4xmpExt:AISystemVersionUsed>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


def _a1111_quote(value: object) -> str:
    """A1111's quoting of a value on its settings line: JSON-quoted where a comma, colon or newline would split it."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def a1111_parameters(record: dict[str, Any]) -> str:
    """A generation record (``GenerationRecord.as_dict()``) as A1111 writes its ``parameters`` text: the prompt,
    ``Negative prompt: …`` if there is one, then one line of ``Key: value`` settings."""
    lines = [str(record["prompt"])]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    settings: dict[str, object] = {
        "Steps": record["steps"],
        "Sampler": display_name(str(record["sampler"])),
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
    }
    if record.get("strength") is not None:  # an edit
        settings["Denoising strength"] = record["strength"]
    lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def encode_labeled(
    pixels: np.ndarray, fmt: str, compression: int | None, xmp: bytes, parameters: dict[str, Any]
) -> bytes:
    """Encode (H, W, 3) uint8 pixels as PNG/JPEG/WebP with the XMP label embedded."""
    image = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
        info.add_text(A1111_PARAMETERS_KEY, a1111_parameters(parameters))  # PIL writes iTXt for non-Latin-1 text
        image.save(buf, format="PNG", pnginfo=info, compress_level=6)  # lossless: output_compression is for JPEG/WebP
    elif fmt in ("jpeg", "webp"):
        # OpenAI's output_compression is a quality: 100 compresses least. Absent, 90 (the watermark survives both).
        quality = 90 if compression is None else compression
        options: dict[str, Any] = {"quality": quality, "xmp": xmp}
        if fmt == "jpeg" and quality >= 90:
            options["subsampling"] = 0  # full-resolution colour: subsampled chroma smears a product's colour edges
        image.save(buf, format=fmt.upper(), **options)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()
