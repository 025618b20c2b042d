"""Record the exact bytes real image clients send, as fixtures for ``tests/test_client_shapes.py``.

How it works: a tiny HTTP/1.1 server on 127.0.0.1 keeps every request byte for byte (request
line, headers exactly as sent, body with its chunked framing as received) and answers a plausible
images response (``data[0]`` carries both ``url`` and ``b64_json``). Each scenario runs one real
client in a subprocess against it, which must send exactly one request. The request is then
stored as ``tests/fixtures/clients/<name>.http`` with two placeholders in the head only: the API
key as ``${API_KEY}`` (so the header reads ``Bearer ${API_KEY}``) and the recorder's
``127.0.0.1:<port>`` as ``${HOST}``. The body is never touched, so a Content-Length stays right
after substitution. Beside it ``<name>.json`` says which client and version produced it, how it
was obtained, what the client reads from the response, and exactly which JSON body the gateway
must forward upstream for it (uploaded files as data URLs built from the uploaded bytes).

Two kinds of fixtures:

* ``recorded``: the real client library, called the way its users call it (OpenAI Python SDK
  2.x and 3.x, OpenAI Node SDK 4.x and 6.x, LangChain's ``DallEAPIWrapper``).
* ``reconstructed``: applications that cannot run here (Open WebUI, LibreChat). Their images
  code was read at a pinned commit and the same calls are made with the same HTTP library at the
  version they depend on (aiohttp for Open WebUI; the Node ``openai`` 5.8.2 package, ``axios`` and
  ``form-data`` for LibreChat); the sidecar names the source file and commit.

The clients live outside the project (throwaway environments), for example::

    python3.11 -m venv /tmp/oai2 && /tmp/oai2/bin/pip install 'openai<3'
    python3.11 -m venv /tmp/lc && /tmp/lc/bin/pip install langchain-community openai
    mkdir /tmp/nodeoai && cd /tmp/nodeoai && npm init -y && npm install openai
    mkdir /tmp/nodeoai4 && cd /tmp/nodeoai4 && npm init -y && npm install openai@4
    mkdir /tmp/librechat && cd /tmp/librechat && npm init -y \\
        && npm install openai@5.8.2 'axios@^1.12.1' 'form-data@^4.0.4'

then, from the repository root::

    .venv/bin/python tests/record_client_shapes.py \\
        --py3 .venv/bin/python --py2 /tmp/oai2/bin/python --langchain /tmp/lc/bin/python \\
        --node-openai /tmp/nodeoai --node-openai4 /tmp/nodeoai4 --librechat /tmp/librechat \\
        [--only NAME ...]

Re-recording rewrites the fixtures (multipart boundaries, UUID filenames and platform headers
change); review the diff before keeping it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``gateway`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.upstream.pngs import solid_png

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clients"
API_KEY = "sk-recorder-0000000000000000000000000000"
KEY_PLACEHOLDER = b"${API_KEY}"
HOST_PLACEHOLDER = b"${HOST}"
SCENARIO_TIMEOUT_S = 60

# The uploaded images: real, small and valid. The JPEG is a 2x2 baseline JFIF (331 bytes).
FOX_PNG = solid_png(2, 2, (220, 90, 40))
SKY_PNG = solid_png(3, 2, (30, 120, 200))
CAT_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0a"
    "HBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5PTgyPC4zNDL/wAALCAACAAIBAREA/8QAHwAAAQUBAQEB"
    "AQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1Fh"
    "ByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZ"
    "WmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
    "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/9oACAEBAAA/ACv/2Q=="
)
IMAGES = {"fox.png": FOX_PNG, "sky.png": SKY_PNG, "cat.jpg": CAT_JPEG}

OPEN_WEBUI = {
    "repository": "open-webui/open-webui",
    "commit": "02530d501461ce58ab06231d7c2ef2024a141ddf",
    "files": [
        "backend/open_webui/routers/images.py (image_generations, image_edits, "
        "get_image_file_item)",
        "backend/open_webui/utils/session_pool.py (get_session: the shared aiohttp session, "
        "trust_env=True)",
        "backend/open_webui/config.py (IMAGE_SIZE default 512x512, "
        "IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN default ^gpt-image)",
    ],
}
LIBRECHAT = {
    "repository": "danny-avila/LibreChat",
    "commit": "8731432f64aaaf70633b0a60922ee8182baa630d",
    "files": [
        "api/app/clients/tools/structured/OpenAIImageTools.js (image_gen_oai: openai "
        "images.generate; image_edit_oai: axios + form-data POST /images/edits)",
        "api/package.json (openai 5.8.2, axios ^1.12.1, form-data ^4.0.4)",
        "api/server/services/Files/Local/crud.js (getLocalFileStream: fs.createReadStream)",
    ],
}
LIBRECHAT_CONFIG = {"teams": {"design": {"default_response_format": "b64_json"}}}


# -- the recording server ---------------------------------------------------------------------


@dataclass
class Recorder:
    port: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                raw = await read_request(reader, writer)
                if raw is None:
                    break
                self.requests.append(raw)
                body = json.dumps(self._answer()).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _answer(self) -> dict[str, Any]:
        png = solid_png(4, 4, (10, 200, 90))
        url = f"http://127.0.0.1:{self.port}/v1/images/files/gpt-image-2/20261126/rec-1.png"
        return {
            "created": 1_790_000_000,
            "data": [{"url": url, "b64_json": base64.b64encode(png).decode()}],
        }


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """One request exactly as it arrived (chunked bodies keep their framing), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    headers = header_map(head)
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            body += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    body += line
                    if line == b"\r\n":
                        return head + body
            body += await reader.readexactly(size + 2)
    length = int(headers.get("content-length", "0"))
    return head + await reader.readexactly(length)


def header_map(head: bytes) -> dict[str, str]:
    """Lower-cased header names to values (the last one wins; enough for framing)."""
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        line, _, rest = body.partition(b"\r\n")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2 :]


def multipart_parts(content_type: str, body: bytes) -> list[dict[str, Any]]:
    """The parts of a multipart body, in order: name, filename, content type, size, digest."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary, content_type
    delimiter = b"--" + boundary[1].encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        headers = header_map(b"X\r\n" + head)
        disposition = headers.get("content-disposition", "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        part: dict[str, Any] = {"name": name[1] if name else None}
        if filename:
            part["filename"] = filename[1]
            part["content_type"] = headers.get("content-type")
            part["bytes"] = len(data)
            part["sha256"] = hashlib.sha256(data).hexdigest()
        else:
            part["value"] = data.decode("utf-8")
            if "content-type" in headers:
                part["content_type"] = headers["content-type"]
        parts.append(part)
    return parts


# -- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    runner: str  # py3 | py2 | langchain | node6 | node4 | librechat | aiohttp
    code: str
    client: str
    call: str
    reads: str  # "url" or "b64_json": what the client takes from data[]
    endpoint: str
    upstream: dict[str, Any]  # the upstream JSON body, except image_urls
    uploads: tuple[str, ...] = ()  # names in IMAGES, in the order the upstream must get them
    not_upstream: tuple[str, ...] = ()  # parameters the client sent that must stop at the gateway
    ignored_header: str | None = None  # the gateway's X-Gateway-Ignored-Params, if any
    obtained: str = "recorded"
    source: dict[str, Any] | None = None
    gateway_config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def upstream(prompt: str, *, n: int = 1, size: str = "1:1", quality: str = "medium") -> dict:
    return {
        "model": "gpt-image-2",
        "prompt": prompt,
        "n": n,
        "size": size,
        "resolution": "1k",
        "quality": quality,
    }


PY_PRELUDE = """
import asyncio, os
from pathlib import Path
import openai
BASE, KEY, IMAGES = os.environ["REC_BASE_URL"], os.environ["REC_API_KEY"], Path(os.environ["REC_IMAGES"])
def sync_client():
    return openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0)
def async_client():
    return openai.AsyncOpenAI(base_url=BASE, api_key=KEY, max_retries=0)
"""


def openai_python_scenarios(major: int) -> list[Scenario]:
    runner = f"py{major}"
    client = f"OpenAI Python SDK {major}.x"
    p = f"sdk{major}"
    return [
        Scenario(
            name=f"openai_python{major}_generate_sync",
            runner=runner,
            client=client,
            call='OpenAI().images.generate(model="gpt-image-1", prompt=..., size="1536x1024", '
            'quality="high")',
            code=f"""
r = sync_client().images.generate(model="gpt-image-1", prompt="{p}: a red fox in the snow",
                                  size="1536x1024", quality="high")
print(r.data[0].url)
""",
            reads="url",
            endpoint="/v1/images/generations",
            upstream=upstream(f"{p}: a red fox in the snow", size="3:2", quality="high"),
        ),
        Scenario(
            name=f"openai_python{major}_generate_async_b64",
            runner=runner,
            client=client,
            call='AsyncOpenAI().images.generate(model="dall-e-3", prompt=..., size="1024x1792", '
            'response_format="b64_json")',
            code=f"""
async def main():
    r = await async_client().images.generate(model="dall-e-3", prompt="{p}: a lighthouse at dusk",
                                             size="1024x1792", response_format="b64_json")
    print(len(r.data[0].b64_json))
asyncio.run(main())
""",
            reads="b64_json",
            endpoint="/v1/images/generations",
            upstream=upstream(f"{p}: a lighthouse at dusk", size="9:16"),
            not_upstream=("response_format",),
        ),
        Scenario(
            name=f"openai_python{major}_edit_one_file_sync",
            runner=runner,
            client=client,
            call='OpenAI().images.edit(image=open("fox.png", "rb"), prompt=..., '
            'model="gpt-image-1", size="1024x1024")',
            code=f"""
with open(IMAGES / "fox.png", "rb") as image:
    r = sync_client().images.edit(image=image, prompt="{p}: make it winter",
                                  model="gpt-image-1", size="1024x1024")
print(r.data[0].url)
""",
            reads="url",
            endpoint="/v1/images/edits",
            upstream=upstream(f"{p}: make it winter"),
            uploads=("fox.png",),
        ),
        Scenario(
            name=f"openai_python{major}_edit_list_async",
            runner=runner,
            client=client,
            call='AsyncOpenAI().images.edit(image=[open("fox.png", "rb"), open("cat.jpg", "rb")], '
            "prompt=..., n=2)",
            code=f"""
async def main():
    with open(IMAGES / "fox.png", "rb") as fox, open(IMAGES / "cat.jpg", "rb") as cat:
        r = await async_client().images.edit(image=[fox, cat],
                                             prompt="{p}: the cat next to the fox", n=2)
    print([d.url for d in r.data])
asyncio.run(main())
""",
            reads="url",
            endpoint="/v1/images/edits",
            upstream=upstream(f"{p}: the cat next to the fox", n=2),
            uploads=("fox.png", "cat.jpg"),
        ),
        Scenario(
            name=f"openai_python{major}_edit_bytes_sync",
            runner=runner,
            client=client,
            call='OpenAI().images.edit(image=Path("sky.png").read_bytes(), prompt=..., '
            'quality="low")',
            code=f"""
r = sync_client().images.edit(image=(IMAGES / "sky.png").read_bytes(),
                              prompt="{p}: add a rainbow", quality="low")
print(r.data[0].url)
""",
            reads="url",
            endpoint="/v1/images/edits",
            upstream=upstream(f"{p}: add a rainbow", quality="low"),
            uploads=("sky.png",),
        ),
    ]


NODE_PRELUDE = """
const fs = require('fs');
const path = require('path');
const { OpenAI, toFile } = require('openai');
const BASE = process.env.REC_BASE_URL, KEY = process.env.REC_API_KEY, IMAGES = process.env.REC_IMAGES;
const client = new OpenAI({ baseURL: BASE, apiKey: KEY, maxRetries: 0 });
const img = (name) => fs.readFileSync(path.join(IMAGES, name));
"""


def openai_node_scenarios(major: int) -> list[Scenario]:
    runner = f"node{major}"
    client = f"OpenAI Node SDK {major}.x"
    p = f"node{major}"
    scenarios = [
        Scenario(
            name=f"openai_node{major}_generate",
            runner=runner,
            client=client,
            call="client.images.generate({model: 'gpt-image-1', prompt, size: '1024x1024', "
            "quality: 'medium', n: 1})",
            code=f"""
(async () => {{
  const r = await client.images.generate({{ model: 'gpt-image-1', prompt: '{p}: a paper boat',
                                           size: '1024x1024', quality: 'medium', n: 1 }});
  console.log(r.data[0].url);
}})();
""",
            reads="url",
            endpoint="/v1/images/generations",
            upstream=upstream(f"{p}: a paper boat"),
        ),
        Scenario(
            name=f"openai_node{major}_edit_tofile_list",
            runner=runner,
            client=client,
            call="client.images.edit({image: [await toFile(buf), await toFile(buf2)], prompt, "
            "model: 'gpt-image-1'})",
            code=f"""
(async () => {{
  const r = await client.images.edit({{
    image: [await toFile(img('fox.png')), await toFile(img('cat.jpg'))],
    prompt: '{p}: the fox and the cat at the beach',
    model: 'gpt-image-1',
  }});
  console.log(r.data[0].url);
}})();
""",
            reads="url",
            endpoint="/v1/images/edits",
            upstream=upstream(f"{p}: the fox and the cat at the beach"),
            uploads=("fox.png", "cat.jpg"),
            notes="Buffers passed through toFile() without a name: parts are named "
            "'unknown_file' with Content-Type application/octet-stream. Parts follow the "
            "order of the keys in the params object (image first here).",
        ),
        Scenario(
            name=f"openai_node{major}_edit_readstream",
            runner=runner,
            client=client,
            call="client.images.edit({image: fs.createReadStream('fox.png'), prompt, size: "
            "'1536x1024', response_format: 'b64_json'})",
            code=f"""
(async () => {{
  const r = await client.images.edit({{
    image: fs.createReadStream(path.join(IMAGES, 'fox.png')),
    prompt: '{p}: the fox in a forest',
    size: '1536x1024',
    response_format: 'b64_json',
  }});
  console.log(r.data[0].b64_json.length);
}})();
""",
            reads="b64_json",
            endpoint="/v1/images/edits",
            upstream=upstream(f"{p}: the fox in a forest", size="3:2"),
            uploads=("fox.png",),
            not_upstream=("response_format",),
        ),
    ]
    if major >= 6:  # streams as uploads: the SDK encodes the multipart body itself, chunked
        scenarios.append(
            Scenario(
                name=f"openai_node{major}_edit_stream_list",
                runner=runner,
                client=client,
                call="client.images.edit({image: [Readable.from([buf]), Readable.from([buf2])], "
                "prompt, model: 'gpt-image-1', n: 2})",
                code=f"""
const {{ Readable }} = require('stream');
(async () => {{
  const r = await client.images.edit({{
    image: [Readable.from([img('sky.png')]), Readable.from([img('cat.jpg')])],
    prompt: '{p}: a cat under the sky',
    model: 'gpt-image-1',
    n: 2,
  }});
  console.log(r.data[0].url);
}})();
""",
                reads="url",
                endpoint="/v1/images/edits",
                upstream=upstream(f"{p}: a cat under the sky", n=2),
                uploads=("sky.png", "cat.jpg"),
                notes="Streams without a name: files first (key order), parts 'image[]' "
                "named 'unknown_file', application/octet-stream, and the body sent with "
                "Transfer-Encoding: chunked and no Content-Length.",
            )
        )
    return scenarios


LANGCHAIN = Scenario(
    name="langchain_dalle_wrapper",
    runner="langchain",
    client="LangChain DallEAPIWrapper (langchain-community)",
    call='DallEAPIWrapper(model="dall-e-2", size="1024x1024", quality="standard", n=1, '
    "api_key=..., base_url=...).run(prompt)",
    code="""
import os
from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper
wrapper = DallEAPIWrapper(model="dall-e-2", size="1024x1024", quality="standard", n=1,
                          api_key=os.environ["REC_API_KEY"], base_url=os.environ["REC_BASE_URL"])
print(wrapper.run("langchain: a watercolor harbour"))
""",
    reads="url",
    endpoint="/v1/images/generations",
    upstream=upstream("langchain: a watercolor harbour"),
)

# Open WebUI (backend/open_webui/routers/images.py): the same aiohttp calls, same session setup.
OWUI_PRELUDE = """
import asyncio, base64, io, json, mimetypes, os, uuid
from pathlib import Path
import aiohttp
BASE, KEY, IMAGES = os.environ["REC_BASE_URL"], os.environ["REC_API_KEY"], Path(os.environ["REC_IMAGES"])
IMAGE_FILE_EXTENSIONS = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/mpo": ".jpg",
                         "image/png": ".png", "image/webp": ".webp"}
def session():  # utils/session_pool.get_session
    connector = aiohttp.TCPConnector(ttl_dns_cache=300, enable_cleanup_closed=True,
                                     limit=0, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300),
                                 trust_env=True)
def data_url(name, mime):  # what the chat hands image_edits: a data URL
    return f"data:{mime};base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()
def get_image_file_item(base64_string, param_name="image"):  # routers/images.py
    header, encoded = base64_string.split(",", 1)
    mime_type = header.split(";")[0].lstrip("data:") or "image/png"
    image_data = base64.b64decode(encoded)
    extension = (IMAGE_FILE_EXTENSIONS.get(mime_type.lower())
                 or mimetypes.guess_extension(mime_type) or ".png")
    return (param_name, (f"{uuid.uuid4()}{extension}", io.BytesIO(image_data), mime_type))
async def post_edit(data, files):  # routers/images.py image_edits, engine "openai"
    headers = {"Authorization": f"Bearer {KEY}"}
    form = aiohttp.FormData()
    for key, value in data.items():
        form.add_field(key, json.dumps(value) if isinstance(value, dict) else str(value))
    for param_name, (filename, file_obj, content_type_val) in files:
        form.add_field(param_name, file_obj, filename=filename, content_type=content_type_val)
    async with session() as s:
        async with s.post(url=f"{BASE}/images/edits", headers=headers, data=form) as r:
            r.raise_for_status()
            res = await r.json(content_type=None)
    print([image.get("url") or len(image["b64_json"]) for image in res["data"]])
"""

OPEN_WEBUI_SCENARIOS = [
    Scenario(
        name="openwebui_generate",
        runner="aiohttp",
        client="Open WebUI (image_generations, engine openai)",
        call="session.post(f'{IMAGES_OPENAI_API_BASE_URL}/images/generations', json={model, "
        "prompt, n, size, response_format: 'b64_json'}, headers={Authorization, Content-Type})",
        code="""
async def main():  # routers/images.py image_generations, engine "openai", default config
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = {"model": "dall-e-2", "prompt": "owui: a cozy reading nook", "n": 1,
            "size": "512x512", "response_format": "b64_json"}
    async with session() as s:
        async with s.post(url=f"{BASE}/images/generations", json=data, headers=headers) as r:
            r.raise_for_status()
            res = await r.json(content_type=None)
    print([image.get("url") or len(image["b64_json"]) for image in res["data"]])
asyncio.run(main())
""",
        reads="b64_json",
        endpoint="/v1/images/generations",
        upstream=upstream("owui: a cozy reading nook"),
        not_upstream=("response_format",),
        obtained="reconstructed",
        source=OPEN_WEBUI,
        notes="Default config: IMAGE_GENERATION_MODEL empty, so get_image_model() answers "
        "'dall-e-2'; IMAGE_SIZE 512x512; the model does not match ^gpt-image, so "
        "response_format b64_json is added. Open WebUI takes data[].url when present (and "
        "downloads it), else data[].b64_json; the gateway answers b64_json only.",
    ),
    Scenario(
        name="openwebui_edit_one",
        runner="aiohttp",
        client="Open WebUI (image_edits, engine openai)",
        call="aiohttp.FormData: fields model, prompt, size; then file part 'image' named "
        "<uuid4>.png",
        code="""
asyncio.run(post_edit(
    {"model": "gpt-image-1", "prompt": "owui: turn the fox blue", "size": "1024x1024"},
    [get_image_file_item(data_url("fox.png", "image/png"))],
))
""",
        reads="url",
        endpoint="/v1/images/edits",
        upstream=upstream("owui: turn the fox blue"),
        uploads=("fox.png",),
        obtained="reconstructed",
        source=OPEN_WEBUI,
        notes="IMAGE_EDIT_MODEL gpt-image-1, IMAGE_EDIT_SIZE 1024x1024, one image (a str): "
        "part 'image'. gpt-image-1 matches ^gpt-image, so no response_format is sent; Open "
        "WebUI then reads data[].url.",
    ),
    Scenario(
        name="openwebui_edit_list",
        runner="aiohttp",
        client="Open WebUI (image_edits, engine openai)",
        call="aiohttp.FormData: fields model, prompt, n, background; then file parts "
        "'image[]' named <uuid4>.png and <uuid4>.jpg",
        code="""
asyncio.run(post_edit(
    {"model": "gpt-image-1", "prompt": "owui: combine both pictures", "n": 1,
     "background": "transparent"},
    [get_image_file_item(data_url("fox.png", "image/png"), "image[]"),
     get_image_file_item(data_url("cat.jpg", "image/jpeg"), "image[]")],
))
""",
        reads="url",
        endpoint="/v1/images/edits",
        upstream=upstream("owui: combine both pictures"),
        uploads=("fox.png", "cat.jpg"),
        not_upstream=("background",),
        ignored_header="background",
        obtained="reconstructed",
        source=OPEN_WEBUI,
        notes="Two images (a list): parts 'image[]'. n and background come from the edit "
        "form; no size (IMAGE_EDIT_SIZE unset), so the gateway's default 1:1 applies.",
    ),
]

LIBRECHAT_GENERATE = """
const OpenAI = require('openai');
const BASE = process.env.REC_BASE_URL, KEY = process.env.REC_API_KEY;
function replaceUnwantedChars(s) { return s.replace(/\\r\\n|\\r|\\n/g, ' ').replace(/"/g, '').trim(); }
(async () => {  // image_gen_oai with its defaults; imageOutputType png
  const openai = new OpenAI({ apiKey: KEY, baseURL: BASE });
  const output_format = 'png', output_compression = 100;
  const resp = await openai.images.generate(
    {
      model: 'gpt-image-1',
      prompt: replaceUnwantedChars('librechat: a neon\\ncity skyline'),
      n: Math.min(Math.max(1, 1), 10),
      background: 'auto',
      output_format,
      output_compression:
        output_format === 'webp' || output_format === 'jpeg' ? output_compression : undefined,
      quality: 'auto',
      size: 'auto',
    },
    { signal: null },
  );
  console.log(resp.data[0].b64_json.length);
})();
"""

LIBRECHAT_EDIT = """
const fs = require('fs');
const path = require('path');
const { Readable } = require('stream');
const axios = require('axios');
const FormData = require('form-data');
const BASE = process.env.REC_BASE_URL, KEY = process.env.REC_API_KEY, IMAGES = process.env.REC_IMAGES;
function replaceUnwantedChars(s) { return s.replace(/\\r\\n|\\r|\\n/g, ' ').replace(/"/g, '').trim(); }
(async () => {  // image_edit_oai with its defaults (quality auto, size auto)
  const formData = new FormData();
  formData.append('model', 'gpt-image-1');
  formData.append('prompt', replaceUnwantedChars(process.env.REC_PROMPT));
  formData.append('quality', 'auto');
  formData.append('size', 'auto');
  const file = path.join(IMAGES, 'fox.png');
  const stream = process.env.REC_STREAM === 'file'
    ? fs.createReadStream(file)                        // Local strategy: getLocalFileStream
    : Readable.from([fs.readFileSync(file)]);          // a remote strategy's body stream
  formData.append('image[]', stream, { filename: 'fox.png', contentType: 'image/png' });
  const headers = { ...formData.getHeaders() };
  headers['Authorization'] = `Bearer ${KEY}`;
  const clientConfig = { apiKey: KEY, baseURL: BASE };
  const axiosConfig = { headers, ...clientConfig, signal: null, baseURL: BASE };
  const response = await axios.post('/images/edits', formData, axiosConfig);
  console.log(response.data.data[0].b64_json.length);
})();
"""

LIBRECHAT_SCENARIOS = [
    Scenario(
        name="librechat_generate",
        runner="librechat",
        client="LibreChat (image_gen_oai tool)",
        call="new OpenAI({apiKey, baseURL}).images.generate({model: 'gpt-image-1', prompt, n: 1, "
        "background: 'auto', output_format: 'png', output_compression: undefined, "
        "quality: 'auto', size: 'auto'})",
        code=LIBRECHAT_GENERATE,
        reads="b64_json",
        endpoint="/v1/images/generations",
        upstream=upstream("librechat: a neon city skyline", quality="auto"),
        not_upstream=("background", "output_format"),
        ignored_header="background, output_format",
        obtained="reconstructed",
        source=LIBRECHAT,
        gateway_config=LIBRECHAT_CONFIG,
        notes="LibreChat sends no response_format (gpt-image-1 always answers b64_json) and "
        "reads data[0].b64_json, so its team needs default_response_format = 'b64_json'. "
        "output_compression is undefined for png and JSON.stringify drops it.",
    ),
    Scenario(
        name="librechat_edit_local_file",
        runner="librechat",
        client="LibreChat (image_edit_oai tool, local file strategy)",
        call="axios.post('/images/edits', formData) with form-data: model, prompt, quality, size, "
        "then 'image[]' = fs.createReadStream(...) {filename, contentType}",
        code=LIBRECHAT_EDIT,
        reads="b64_json",
        endpoint="/v1/images/edits",
        upstream=upstream("librechat: give the fox a scarf", quality="auto"),
        uploads=("fox.png",),
        obtained="reconstructed",
        source=LIBRECHAT,
        gateway_config=LIBRECHAT_CONFIG,
        notes="One image, still sent as 'image[]'. The file stream comes from "
        "fs.createReadStream, whose length form-data can measure.",
    ),
    Scenario(
        name="librechat_edit_stream",
        runner="librechat",
        client="LibreChat (image_edit_oai tool, remote file strategy)",
        call="axios.post('/images/edits', formData) with form-data: model, prompt, quality, size, "
        "then 'image[]' = a Readable of unknown length (e.g. an S3 body) {filename, contentType}",
        code=LIBRECHAT_EDIT,
        reads="b64_json",
        endpoint="/v1/images/edits",
        upstream=upstream("librechat: the fox as a statue", quality="auto"),
        uploads=("fox.png",),
        obtained="reconstructed",
        source=LIBRECHAT,
        gateway_config=LIBRECHAT_CONFIG,
        notes="Remote strategies (S3, Azure, Firebase) hand form-data a stream of unknown "
        "length; here a Readable stands in for it.",
    ),
]

ENV_BY_SCENARIO = {
    "librechat_edit_local_file": {
        "REC_STREAM": "file",
        "REC_PROMPT": "librechat: give the fox a scarf",
    },
    "librechat_edit_stream": {
        "REC_STREAM": "stream",
        "REC_PROMPT": "librechat: the fox as a statue",
    },
}


def all_scenarios() -> list[Scenario]:
    return [
        *openai_python_scenarios(3),
        *openai_python_scenarios(2),
        *openai_node_scenarios(6),
        *openai_node_scenarios(4),
        LANGCHAIN,
        *OPEN_WEBUI_SCENARIOS,
        *LIBRECHAT_SCENARIOS,
    ]


# -- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runners:
    py3: str
    py2: str
    langchain: str
    node_openai: str
    node_openai4: str
    librechat: str

    def command(self, scenario: Scenario) -> tuple[list[str], dict[str, str]]:
        if scenario.runner in ("py3", "py2", "aiohttp", "langchain"):
            python = {"py3": self.py3, "py2": self.py2, "aiohttp": self.py3}.get(
                scenario.runner, self.langchain
            )
            prelude = {"aiohttp": OWUI_PRELUDE, "langchain": ""}.get(scenario.runner, PY_PRELUDE)
            return [python, "-c", prelude + textwrap.dedent(scenario.code)], {}
        node_dir = {"node6": self.node_openai, "node4": self.node_openai4}.get(
            scenario.runner, self.librechat
        )
        prelude = "" if scenario.runner == "librechat" else NODE_PRELUDE
        env = {"NODE_PATH": str(Path(node_dir) / "node_modules")}
        return ["node", "-e", prelude + scenario.code], env

    def version(self, scenario: Scenario) -> dict[str, str]:
        def py(python: str, expr: str) -> str:
            return subprocess.run(
                [python, "-c", f"import sys; {expr}; print(sys.version.split()[0])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        def npm(node_dir: str, package: str) -> str:
            manifest = Path(node_dir) / "node_modules" / package / "package.json"
            return json.loads(manifest.read_text())["version"]

        node = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if scenario.runner in ("py3", "py2"):
            python = self.py3 if scenario.runner == "py3" else self.py2
            out = py(python, "import openai; print(openai.__version__)").split()
            http_name, http_version = _httpx(python).split()
            return {"openai": out[0], http_name: http_version, "python": out[1]}
        if scenario.runner == "aiohttp":
            out = py(self.py3, "import aiohttp; print(aiohttp.__version__)").split()
            return {"aiohttp": out[0], "python": out[1]}
        if scenario.runner == "langchain":
            out = py(
                self.langchain,
                "import importlib.metadata as m; "
                "print(m.version('langchain-community'), m.version('openai'))",
            ).split()
            return {"langchain-community": out[0], "openai": out[1], "python": out[2]}
        if scenario.runner in ("node6", "node4"):
            node_dir = self.node_openai if scenario.runner == "node6" else self.node_openai4
            return {"openai (npm)": npm(node_dir, "openai"), "node": node}
        return {
            "openai (npm)": npm(self.librechat, "openai"),
            "axios": npm(self.librechat, "axios"),
            "form-data": npm(self.librechat, "form-data"),
            "node": node,
        }


def _httpx(python: str) -> str:
    code = (
        "import importlib.metadata as m\n"
        "for name in ('httpx', 'httpx2'):\n"
        "    try: print(name, m.version(name)); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def record(scenario: Scenario, runners: Runners, recorder: Recorder, images: Path) -> None:
    recorder.requests.clear()
    argv, extra_env = runners.command(scenario)
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "openai_api_key")
    }
    env.update(
        REC_BASE_URL=f"http://127.0.0.1:{recorder.port}/v1",
        REC_API_KEY=API_KEY,
        REC_IMAGES=str(images),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra_env,
        **ENV_BY_SCENARIO.get(scenario.name, {}),
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), SCENARIO_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{scenario.name}: client failed:\n{err.decode()[-3000:]}")
    if len(recorder.requests) != 1:
        raise RuntimeError(f"{scenario.name}: expected 1 request, got {len(recorder.requests)}")
    write_fixture(scenario, recorder.requests[0], recorder.port, runners, out.decode())


def write_fixture(
    scenario: Scenario, raw: bytes, port: int, runners: Runners, client_output: str
) -> None:
    head, sep, body = raw.partition(b"\r\n\r\n")
    host = f"127.0.0.1:{port}".encode()
    for secret in (API_KEY.encode(), host):
        if secret in body:
            raise RuntimeError(f"{scenario.name}: {secret!r} in the body; cannot substitute")
    head = head.replace(API_KEY.encode(), KEY_PLACEHOLDER).replace(host, HOST_PLACEHOLDER)
    assert b"Bearer ${API_KEY}" in head, head
    headers = header_map(head + sep)
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body), scenario.name
    payload = dechunk(body) if chunked else body
    content_type = headers.get("content-type", "")
    sent: Any
    if content_type.startswith("multipart/form-data"):
        sent = multipart_parts(content_type, payload)
        uploaded = [part for part in sent if "filename" in part]
        assert [part["sha256"] for part in uploaded] == [
            hashlib.sha256(IMAGES[name]).hexdigest() for name in scenario.uploads
        ], scenario.name
    else:
        sent = json.loads(payload)
    expected = dict(scenario.upstream)
    if scenario.uploads:
        expected["image_urls"] = [data_url(IMAGES[name]) for name in scenario.uploads]
    meta = {
        "name": scenario.name,
        "client": scenario.client,
        "versions": runners.version(scenario),
        "obtained": scenario.obtained,
        "how": (
            "recorded: the real client library, run against tests/record_client_shapes.py's "
            "recording server on " + platform.system()
            if scenario.obtained == "recorded"
            else "reconstructed: the application's request code (see source) re-run with the "
            "HTTP library it uses, against tests/record_client_shapes.py's recording server"
        ),
        "source": scenario.source,
        "call": scenario.call,
        "endpoint": scenario.endpoint,
        "framing": "chunked" if chunked else "content-length",
        "request_content_type": content_type.split(";")[0],
        "sent": sent,
        "reads": scenario.reads,
        "n": scenario.upstream["n"],
        "gateway_config": scenario.gateway_config,
        "expected_upstream": {"path": scenario.endpoint, "body": expected},
        "must_not_reach_upstream": list(scenario.not_upstream),
        "expected_ignored_params": scenario.ignored_header,
        "notes": scenario.notes,
        "client_output_when_recorded": client_output.strip()[:200],
    }
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / f"{scenario.name}.http").write_bytes(head + sep + body)
    (FIXTURES / f"{scenario.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"recorded {scenario.name}: {len(raw)} bytes, {meta['framing']}")


def data_url(data: bytes) -> str:
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--py3", default=sys.executable, help="python with openai 3.x + aiohttp")
    parser.add_argument("--py2", required=True, help="python with openai 2.x")
    parser.add_argument("--langchain", required=True, help="python with langchain-community")
    parser.add_argument("--node-openai", required=True, help="npm dir with openai 6.x")
    parser.add_argument("--node-openai4", required=True, help="npm dir with openai 4.x")
    parser.add_argument("--librechat", required=True, help="npm dir with openai, axios, form-data")
    parser.add_argument("--only", nargs="*", help="record only these scenario names")
    args = parser.parse_args(argv)
    runners = Runners(
        args.py3, args.py2, args.langchain, args.node_openai, args.node_openai4, args.librechat
    )
    scenarios = [s for s in all_scenarios() if not args.only or s.name in args.only]
    recorder = Recorder()
    server = await recorder.start()
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp)
        for name, data in IMAGES.items():
            (images / name).write_bytes(data)
        for scenario in scenarios:
            try:
                await record(scenario, runners, recorder, images)
            except (RuntimeError, AssertionError, TimeoutError) as exc:
                failed.append(scenario.name)
                print(f"FAILED {scenario.name}: {exc}", file=sys.stderr)
    server.close()
    await server.wait_closed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
