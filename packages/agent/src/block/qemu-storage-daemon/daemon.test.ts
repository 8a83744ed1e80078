import { describe, expect, it } from "vitest";
import { daemonArgs, StorageDaemons } from "./daemon.js";

describe("qemu-storage-daemon command line", () => {
  const p = new StorageDaemons("/state").paths("vol-1");

  it("has one folder per volume with its pid file, QMP and export sockets", () => {
    expect(p).toEqual({
      dir: "/state/block/daemons/vol-1",
      record: "/state/block/daemons/vol-1/daemon.json",
      pidFile: "/state/block/daemons/vol-1/qsd.pid",
      qmp: "/state/block/daemons/vol-1/qmp.sock",
      socket: "/state/block/daemons/vol-1/export.sock",
    });
  });

  it("exports a writable qcow2 volume over vhost-user-blk, daemonized, commas in paths doubled", () => {
    const args = daemonArgs(
      {
        volumeId: "vol-1",
        kind: "vhost-user-blk",
        path: "/s,x/vol-1.qcow2",
        format: "qcow2",
        writable: true,
      },
      p,
    );
    expect(args).toEqual([
      "--blockdev",
      "driver=file,filename=/s,,x/vol-1.qcow2,node-name=file,read-only=off",
      "--blockdev",
      "driver=qcow2,file=file,node-name=disk,read-only=off",
      "--export",
      "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=/state/block/daemons/vol-1/export.sock,writable=on,num-queues=1",
      "--chardev",
      "socket,id=qmp,path=/state/block/daemons/vol-1/qmp.sock,server=on,wait=off",
      "--monitor",
      "chardev=qmp",
      "--pidfile",
      "/state/block/daemons/vol-1/qsd.pid",
      "--daemonize",
    ]);
  });

  it("exports read-only over NBD under the volume's id", () => {
    const args = daemonArgs(
      { volumeId: "vol-1", kind: "nbd", path: "/s/vol-1.raw", format: "raw", writable: false },
      p,
    ).join(" ");
    expect(args).toContain("driver=file,filename=/s/vol-1.raw,node-name=file,read-only=on");
    expect(args).toContain("--nbd-server addr.type=unix,addr.path=/state/block/daemons/vol-1/export.sock");
    expect(args).toContain("type=nbd,id=exp,node-name=disk,name=vol-1,writable=off");
  });
});
