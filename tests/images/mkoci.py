#!/usr/bin/env python3
"""Packs a root filesystem folder as an OCI image-layout archive for `ctr images import`.

No registry, no daemon, no builder: one GNU tar layer (numeric owners, sorted names, mtime 0,
so the same folder always gives the same digests), then one config and one manifest per tag.
Tags differ only in their config (the user), so they share the layer: importing the archive
stores and unpacks it once.

    mkoci.py ROOTFS OUT.tar --tag NAME=USER [--tag NAME=USER ...]
             [--entrypoint JSON] [--cmd JSON] [--env K=V ...] [--workdir DIR]

Prints one JSON line per tag: {"name", "manifest", "layerBytes"}.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rootfs")
    parser.add_argument("out")
    parser.add_argument("--tag", action="append", required=True, help="NAME=USER, e.g. localhost/x:test=1000")
    parser.add_argument("--entrypoint", help="JSON list")
    parser.add_argument("--cmd", help="JSON list")
    parser.add_argument("--env", action="append", default=[], help="K=V")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()

    out = os.path.abspath(args.out)
    work = tempfile.mkdtemp(prefix=".mkoci.", dir=os.path.dirname(out))
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)

        def put_json(obj):
            data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, digest), "wb") as f:
                f.write(data)
            return {"digest": "sha256:" + digest, "size": len(data)}

        layer = os.path.join(work, "layer.tar")
        subprocess.run(
            ["tar", "--numeric-owner", "--sort=name", "--mtime=@0", "--format=gnu",
             "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
             "-C", args.rootfs, "-cf", layer, "."],
            check=True,
        )
        layer_digest = sha256_file(layer)
        layer_size = os.path.getsize(layer)
        os.rename(layer, os.path.join(blobs, layer_digest))

        manifests = []
        for tag in args.tag:
            name, _, user = tag.rpartition("=")
            if not name or ":" not in name.rsplit("/", 1)[-1]:
                parser.error(f"--tag {tag!r}: expected NAME:TAG=USER")
            config = {"Env": args.env, "User": user}
            if args.entrypoint:
                config["Entrypoint"] = json.loads(args.entrypoint)
            if args.cmd:
                config["Cmd"] = json.loads(args.cmd)
            if args.workdir:
                config["WorkingDir"] = args.workdir
            image_config = put_json({
                "created": "1970-01-01T00:00:00Z", "architecture": "amd64", "os": "linux", "config": config,
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_digest]},
            })
            manifest = put_json({
                "schemaVersion": 2, "mediaType": MANIFEST,
                "config": dict(image_config, mediaType=CONFIG),
                "layers": [{"mediaType": LAYER, "digest": "sha256:" + layer_digest, "size": layer_size}],
            })
            manifests.append(dict(
                manifest, mediaType=MANIFEST, platform={"architecture": "amd64", "os": "linux"},
                annotations={"io.containerd.image.name": name,
                             "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
            ))
            print(json.dumps({"name": name, "manifest": manifest["digest"], "layerBytes": layer_size}))

        with open(os.path.join(work, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": manifests}, f)
        with open(os.path.join(work, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        entries = ["oci-layout", "index.json", "blobs", "blobs/sha256"]
        entries += ["blobs/sha256/" + n for n in sorted(os.listdir(blobs))]
        with tarfile.open(out + ".part", "w") as archive:
            for rel in entries:
                info = archive.gettarinfo(os.path.join(work, rel), rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(os.path.join(work, rel), "rb") as f:
                        archive.addfile(info, f)
                else:
                    archive.addfile(info)
        os.replace(out + ".part", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
