/**
 * The `qemu-img` adapter: every call is an argument array (never a shell), with the caller's abort
 * signal passed to the child process.
 */
import { VmenvError } from "@vmenv/rpc/errors";
import { execa } from "execa";
import type { VolumeFormat } from "./domain.js";

/** What `qemu-img info --output=json` says about an image (the parts the agent uses). */
export interface ImageInfo {
  format: string;
  virtualSize: bigint;
  actualSize: bigint;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  snapshots: { id: string; name: string; vmStateSize: number; dateSec: number }[];
}

export class QemuImg {
  constructor(private readonly binary = "qemu-img") {}

  async #run(args: string[], signal?: AbortSignal): Promise<string> {
    try {
      const r = await execa(this.binary, args, {
        ...(signal ? { cancelSignal: signal } : {}),
        stdin: "ignore",
        // C locale: messages are parsed by nobody, but read by people in the agent's language.
        env: { LC_ALL: "C" },
      });
      return r.stdout;
    } catch (err) {
      if (signal?.aborted) throw signal.reason ?? err;
      const e = err as { stderr?: string; shortMessage?: string };
      const detail = (e.stderr || e.shortMessage || String(err)).trim().split("\n").slice(-3).join("; ");
      throw new VmenvError("internal", `qemu-img ${args[0]} failed: ${detail}`, {
        reason: "QEMU_IMG_FAILED",
        metadata: { command: args[0] ?? "" },
        cause: err,
      });
    }
  }

  async info(path: string, opts: { format?: string; backingChain?: false } = {}): Promise<ImageInfo> {
    const out = await this.#run([
      "info",
      "--output=json",
      "--force-share",
      ...(opts.format ? ["-f", opts.format] : []),
      "--",
      path,
    ]);
    const j = JSON.parse(out) as {
      format: string;
      "virtual-size": number;
      "actual-size"?: number;
      "backing-filename"?: string;
      "full-backing-filename"?: string;
      "backing-filename-format"?: string;
      snapshots?: { id: string; name: string; "vm-state-size": number; "date-sec": number }[];
    };
    return {
      format: j.format,
      virtualSize: BigInt(j["virtual-size"]),
      actualSize: BigInt(j["actual-size"] ?? 0),
      backingFile: j["full-backing-filename"] ?? j["backing-filename"],
      backingFormat: j["backing-filename-format"],
      snapshots: (j.snapshots ?? []).map((s) => ({
        id: s.id,
        name: s.name,
        vmStateSize: s["vm-state-size"],
        dateSec: s["date-sec"],
      })),
    };
  }

  async create(
    path: string,
    format: VolumeFormat,
    sizeBytes: bigint,
    opts: { preallocate?: boolean; backing?: { file: string; format: string }; signal?: AbortSignal } = {},
  ): Promise<void> {
    const o = opts.preallocate ? ["preallocation=falloc"] : [];
    await this.#run(
      [
        "create",
        "-q",
        "-f",
        format,
        ...(opts.backing ? ["-b", opts.backing.file, "-F", opts.backing.format] : []),
        ...(o.length ? ["-o", o.join(",")] : []),
        "--",
        path,
        String(sizeBytes),
      ],
      opts.signal,
    );
  }

  /** Copies `src` (format `srcFormat`, optionally one of its internal snapshots) into a new `dst`. */
  async convert(
    src: string,
    srcFormat: string,
    dst: string,
    dstFormat: VolumeFormat,
    opts: { snapshot?: string; signal?: AbortSignal } = {},
  ): Promise<void> {
    await this.#run(
      [
        "convert",
        "-q",
        "-f",
        srcFormat,
        ...(opts.snapshot ? ["-l", `snapshot.name=${opts.snapshot}`] : []),
        "-O",
        dstFormat,
        "--",
        src,
        dst,
      ],
      opts.signal,
    );
  }

  async resize(path: string, format: VolumeFormat, sizeBytes: bigint, signal?: AbortSignal): Promise<void> {
    await this.#run(["resize", "-q", "-f", format, "--", path, String(sizeBytes)], signal);
  }

  async snapshotCreate(path: string, tag: string, signal?: AbortSignal): Promise<void> {
    await this.#run(["snapshot", "-q", "-c", tag, "--", path], signal);
  }

  async snapshotDelete(path: string, tag: string, signal?: AbortSignal): Promise<void> {
    await this.#run(["snapshot", "-q", "-d", tag, "--", path], signal);
  }
}
