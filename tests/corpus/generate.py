#!/usr/bin/env python3
"""Builds the hostile and benign image corpus for the inspector tests.

usage: generate.py DIR

Writes each image into DIR and DIR/manifest.json: a list of
{"name", "file", "disk_format", "expect": "ok" | "refused", "why"}.
Images are made with qemu-img (10.x) and, where qemu-img will not make them, by patching the
bytes of a valid image. Needs qemu-img and genisoimage.
"""
import json
import os
import struct
import subprocess
import sys

MIB = 1 << 20


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def data(path, size=4 * MIB, seed=7):
    """A raw disk with a few MiB of pseudo-random data and a hole."""
    x = seed | 1
    out = bytearray()
    while len(out) < size // 2:
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out += struct.pack("<Q", x)
    with open(path, "wb") as f:
        f.write(out[: size // 2])
        f.truncate(size)


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    os.chdir(out)
    manifest = []

    def add(name, disk_format, expect, why, file=None):
        manifest.append({"name": name, "file": file or name, "disk_format": disk_format,
                         "expect": expect, "why": why})

    data("raw.img")
    qcow = lambda dst, *opts: qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, "raw.img", dst)

    # --- benign: must pass, content equal to qemu-img's own conversion ---
    add("raw.img", "raw", "ok", "plain raw")
    qcow("qcow2-v3.qcow2")
    add("qcow2-v3.qcow2", "qcow2", "ok", "qcow2 v3")
    qcow("qcow2-v2.qcow2", "-o", "compat=0.10")
    add("qcow2-v2.qcow2", "qcow2", "ok", "qcow2 v2")
    qcow("qcow2-compressed.qcow2", "-c")
    add("qcow2-compressed.qcow2", "qcow2", "ok", "compressed qcow2")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "raw.img", "stream.vmdk")
    add("stream.vmdk", "vmdk", "ok", "vmdk streamOptimized")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", "raw.img", "sparse.vmdk")
    add("sparse.vmdk", "vmdk", "ok", "vmdk monolithicSparse")
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", "raw.img", "dynamic.vhd")
    add("dynamic.vhd", "vhd", "ok", "vhd (dynamic)")
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "raw.img", "disk.vhdx")
    add("disk.vhdx", "vhdx", "ok", "vhdx")
    qemu_img("convert", "-f", "raw", "-O", "vdi", "raw.img", "disk.vdi")
    add("disk.vdi", "vdi", "ok", "vdi")
    os.makedirs("isotree", exist_ok=True)
    with open("isotree/README.txt", "w") as f:
        f.write("imgcache corpus\n" * 1000)
    subprocess.run(["genisoimage", "-quiet", "-o", "disk.iso", "-V", "CORPUS", "isotree"], check=True)
    add("disk.iso", "iso", "ok", "iso9660")

    # --- hostile or malformed: must be refused before qemu-img convert runs ---
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", "backing-abs.qcow2", "4M")
    add("backing-abs.qcow2", "qcow2", "refused", "qcow2 backing file, absolute path")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../../../../etc/shadow", "-F", "raw", "backing-rel.qcow2", "4M")
    add("backing-rel.qcow2", "qcow2", "refused", "qcow2 backing file, relative path")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
             'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
             "-F", "raw", "backing-json.qcow2", "4M")
    add("backing-json.qcow2", "qcow2", "refused", "qcow2 backing file, json: protocol")
    data("datafile.raw", MIB)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={os.path.abspath('datafile.raw')},data_file_raw=on",
             "data-file.qcow2", "1M")
    os.remove("datafile.raw")
    add("data-file.qcow2", "qcow2", "refused", "qcow2 external data file (CVE-2024-32498)")
    qcow("incompat.qcow2")
    patch("incompat.qcow2", 72, ">Q", 1 << 9)
    add("incompat.qcow2", "qcow2", "refused", "qcow2 unknown incompatible feature bit")
    qcow("version4.qcow2")
    patch("version4.qcow2", 4, ">I", 4)
    add("version4.qcow2", "qcow2", "refused", "qcow2 version 4")
    qcow("full.qcow2")
    with open("full.qcow2", "rb") as f:
        head = f.read(50)
    with open("truncated.qcow2", "wb") as f:
        f.write(head)
    os.remove("full.qcow2")
    add("truncated.qcow2", "qcow2", "refused", "truncated qcow2 header")
    qcow("huge.qcow2")
    patch("huge.qcow2", 24, ">Q", 1 << 62)
    add("huge.qcow2", "qcow2", "refused", "qcow2 virtual size 2^62")
    qcow("l1-beyond.qcow2")
    patch("l1-beyond.qcow2", 40, ">Q", 1 << 40)
    add("l1-beyond.qcow2", "qcow2", "refused", "qcow2 L1 table offset beyond EOF")
    with open("flat-passwd.vmdk", "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="monolithicFlat"\n\nRW 2048 FLAT "/etc/passwd" 0\n')
    add("flat-passwd.vmdk", "vmdk", "refused", "VMDK monolithicFlat extent naming /etc/passwd (CVE-2022-47951)")
    with open("dotdot.vmdk", "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="monolithicSparse"\n\nRW 2048 SPARSE "../secret.vmdk"\n')
    add("dotdot.vmdk", "vmdk", "refused", "VMDK text descriptor with ../ extent")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "twogb.vmdk", "4M")
    add("twogb.vmdk", "vmdk", "refused", "VMDK twoGbMaxExtentSparse (descriptor + extent files)")
    # A sparse VMDK whose embedded descriptor claims a flat extent on a host file.
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", "raw.img", "embedded-flat.vmdk")
    with open("embedded-flat.vmdk", "r+b") as f:
        blob = f.read(64 * 1024)
        at = blob.index(b'RW ')
        end = blob.index(b'\n', at)
        line = b'RW 8192 FLAT "/etc/passwd" 0'
        f.seek(at)
        f.write(line.ljust(end - at, b" "))
    add("embedded-flat.vmdk", "vmdk", "refused", "sparse VMDK whose embedded descriptor names /etc/passwd")
    # What qemu's VMDK driver reads where the descriptor's grammar says nothing: each must be
    # refused by the native inspector alone.
    def sparse_with_line(name, find, line):
        """A monolithicSparse VMDK whose embedded descriptor line starting with `find` is
        replaced by `line` (padded with spaces to the same length)."""
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", "raw.img", name)
        with open(name, "r+b") as f:
            blob = f.read(64 * 1024)
            at = blob.index(find)
            end = blob.index(b"\n", at)
            assert len(line) <= end - at, (name, line)
            f.seek(at)
            f.write(line.ljust(end - at, b" "))
    sparse_with_line("hint-in-comment.vmdk", b"ddb.toolsVersion",
                     b'#parentFileNameHint="/x"')
    add("hint-in-comment.vmdk", "vmdk", "refused", "VMDK parentFileNameHint inside a comment (qemu reads it)")
    sparse_with_line("createtype-in-comment.vmdk", b"# Disk DescriptorFile", b'#createType="vmfs"')
    add("createtype-in-comment.vmdk", "vmdk", "refused", "VMDK createType inside a comment, before the real one")
    sparse_with_line("two-createtypes.vmdk", b"ddb.toolsVersion", b'createType="monolithicFlat"')
    add("two-createtypes.vmdk", "vmdk", "refused", "VMDK with two createType lines")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", "raw.img", "desc-offset.vmdk")
    patch("desc-offset.vmdk", 28, "<Q", 2)
    add("desc-offset.vmdk", "vmdk", "refused", "VMDK descriptor offset away from sector 1 (qemu reads the hint at sector 1)")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", "raw.img", "kdmv-v9.vmdk")
    patch("kdmv-v9.vmdk", 4, "<I", 9)
    add("kdmv-v9.vmdk", "vmdk", "refused", "VMDK sparse header version 9")
    with open("headless.vmdk", "w") as f:
        f.write('version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
                'RW 2048 FLAT "/etc/passwd" 0\n')
    add("headless.vmdk", "vmdk", "refused", "VMDK text descriptor without its '# Disk DescriptorFile' line")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "raw.img", "footer-grain.vmdk")
    # Grain directory "at the end": the header defers to a footer (footer marker, footer, end
    # of stream), whose grain size is not the header's.
    with open("footer-grain.vmdk", "r+b") as f:
        footer = bytearray(f.read(512))
        footer[20:28] = struct.pack("<Q", 256)
        f.seek(56)
        f.write(struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
        f.seek(0, 2)
        f.write(b"\0" * 512 + bytes(footer) + b"\0" * 512)
    add("footer-grain.vmdk", "vmdk", "refused", "streamOptimized VMDK whose footer grain size disagrees with the header")
    qemu_img("create", "-q", "-f", "qed", "disk.qed", "4M")
    add("disk.qed", "raw", "refused", "qed (banned format)")
    qemu_img("create", "-q", "--object", "secret,id=s0,data=corpus", "-f", "luks", "-o", "key-secret=s0",
             "disk.luks", "4M")
    add("disk.luks", "raw", "refused", "luks (encrypted)")
    qcow("qcow2-as-raw.qcow2")
    add("qcow2-as-raw.qcow2", "raw", "refused", "qcow2 bytes declared raw (bug 2071734)")
    add("raw.img", "qcow2", "refused", "raw bytes declared qcow2", file="raw.img")
    manifest[-1]["name"] = "raw-as-qcow2"
    qcow("polyglot.qcow2")
    with open("polyglot.qcow2", "r+b") as f:
        f.seek(0x8000)
        f.write(b"\x01CD001\x01")
    add("polyglot.qcow2", "qcow2", "refused", "iso + qcow2 polyglot")

    with open("manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
