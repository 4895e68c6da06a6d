"""Machine-readable 'this is synthetic' labels written into the encoded file.

IPTC Photo Metadata 2025.1: Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia (an edit of a user's
image: compositeWithTrainedAlgorithmicMedia), plus the AI system used and its version. PNG
also carries the generation parameters as a text chunk.
"""

from __future__ import annotations

import io
import json
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, PngImagePlugin

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
PARAMETERS_KEY = "imagegen:parameters"
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
        # compression 0-100 maps onto zlib levels 0-9 (PNG stays lossless)
        level = 6 if compression is None else round(compression * 9 / 100)
        image.save(buf, format="PNG", pnginfo=info, compress_level=level)
    elif fmt in ("jpeg", "webp"):
        quality = 90 if compression is None else 100 - compression
        image.save(buf, format=fmt.upper(), quality=quality, xmp=xmp)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()
