/**
 * VMM binary discovery (adapter): finds QEMU and cloud-hypervisor and asks each for its version. Binaries
 * run with their arguments as an array, never through a shell.
 */
import { constants } from "node:fs";
import { access, stat } from "node:fs/promises";
import { arch } from "node:os";
import { delimiter, join } from "node:path";
import { execa } from "execa";
import {
  HostInventoryParseError,
  parseCloudHypervisorVersion,
  parseQemuVersion,
  type VmmBinaryInfo,
  type VmmKind,
} from "./inventory.js";

export interface VmmDiscoveryOptions {
  /** QEMU binary to use: a path (used as is) or a bare name (looked up on the search path). */
  qemuPath?: string;
  /** cloud-hypervisor binary, the same way. */
  cloudHypervisorPath?: string;
  /** Architecture, as Node.js names it, that picks `qemu-system-<arch>`. Default: os.arch(). */
  architecture?: string;
  /** Search path, PATH syntax. Default: process.env.PATH. */
  searchPath?: string;
  /** Time limit for each `--version` query. Default 5000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

const QEMU_ARCH: Record<string, string> = {
  x64: "x86_64",
  ia32: "i386",
  arm64: "aarch64",
  arm: "arm",
  ppc64: "ppc64",
  riscv64: "riscv64",
  s390x: "s390x",
  loong64: "loongarch64",
};

/** `qemu-system-<arch>` for a Node.js architecture name, e.g. "x64" → "qemu-system-x86_64". */
export function qemuBinaryName(architecture: string): string {
  return `qemu-system-${QEMU_ARCH[architecture] ?? architecture}`;
}

/** Where distributions put a QEMU that is not on PATH (RHEL and derivatives: /usr/libexec/qemu-kvm). */
const QEMU_FALLBACKS = ["/usr/libexec/qemu-kvm"];

/** Finds QEMU (the configured binary, else `qemu-system-<arch>` on the search path) and its version. */
export async function findQemu(options: VmmDiscoveryOptions = {}): Promise<VmmBinaryInfo> {
  const searchPath = options.searchPath ?? process.env.PATH ?? "";
  let path: string | undefined;
  let notFound: string;
  if (options.qemuPath !== undefined) {
    path = await resolveExecutable(options.qemuPath, searchPath);
    notFound = `configured QEMU binary ${options.qemuPath} not found or not executable`;
  } else {
    const architecture = options.architecture ?? arch();
    const name = qemuBinaryName(architecture);
    path = await findExecutable(name, searchPath);
    // The distribution fallbacks are native binaries: only for the host's own architecture.
    for (const candidate of architecture === arch() ? QEMU_FALLBACKS : []) {
      if (path === undefined && (await isExecutable(candidate))) path = candidate;
    }
    notFound = `${name} not found on PATH`;
  }
  if (path === undefined) return unavailable("qemu", undefined, notFound);
  return askVersion("qemu", path, (out) => parseQemuVersion(out).version, options);
}

/** Finds cloud-hypervisor (the configured binary, else `cloud-hypervisor` on the search path). */
export async function findCloudHypervisor(options: VmmDiscoveryOptions = {}): Promise<VmmBinaryInfo> {
  const searchPath = options.searchPath ?? process.env.PATH ?? "";
  const wanted = options.cloudHypervisorPath ?? "cloud-hypervisor";
  const path = await resolveExecutable(wanted, searchPath);
  if (path === undefined) {
    const reason =
      options.cloudHypervisorPath === undefined
        ? "cloud-hypervisor not found on PATH"
        : `configured cloud-hypervisor binary ${wanted} not found or not executable`;
    return unavailable("cloud-hypervisor", undefined, reason);
  }
  return askVersion("cloud-hypervisor", path, parseCloudHypervisorVersion, options);
}

/** Both VMMs, QEMU first. */
export async function discoverVmms(options: VmmDiscoveryOptions = {}): Promise<VmmBinaryInfo[]> {
  return Promise.all([findQemu(options), findCloudHypervisor(options)]);
}

/** First executable file called `name` in the directories of `searchPath` (PATH syntax). */
export async function findExecutable(name: string, searchPath: string): Promise<string | undefined> {
  for (const dir of searchPath.split(delimiter)) {
    if (dir === "") continue;
    const candidate = join(dir, name);
    if (await isExecutable(candidate)) return candidate;
  }
  return undefined;
}

/** A name with a slash is a path, checked as is; a bare name is looked up on the search path. */
async function resolveExecutable(nameOrPath: string, searchPath: string): Promise<string | undefined> {
  if (nameOrPath.includes("/")) return (await isExecutable(nameOrPath)) ? nameOrPath : undefined;
  return findExecutable(nameOrPath, searchPath);
}

async function isExecutable(path: string): Promise<boolean> {
  try {
    const [info] = await Promise.all([stat(path), access(path, constants.X_OK)]);
    return info.isFile();
  } catch {
    return false;
  }
}

async function askVersion(
  kind: VmmKind,
  path: string,
  parse: (output: string) => string,
  options: VmmDiscoveryOptions,
): Promise<VmmBinaryInfo> {
  const run = await execa(path, ["--version"], {
    timeout: options.timeoutMs ?? 5000,
    ...(options.signal ? { cancelSignal: options.signal } : {}),
    killSignal: "SIGKILL",
    reject: false,
    stdin: "ignore",
    maxBuffer: 64 * 1024,
  });
  if (run.isCanceled) options.signal?.throwIfAborted();
  if (run.failed) {
    const why = run.timedOut
      ? `did not answer within ${options.timeoutMs ?? 5000} ms`
      : (firstLine(String(run.stderr ?? "")) ?? run.shortMessage ?? "failed");
    return unavailable(kind, path, `${path} --version: ${why}`);
  }
  try {
    return {
      kind,
      path,
      version: parse(String(run.stdout ?? "")),
      available: true,
      unavailableReason: undefined,
    };
  } catch (err) {
    if (!(err instanceof HostInventoryParseError)) throw err;
    return unavailable(
      kind,
      path,
      `${path} --version: unrecognised output "${firstLine(String(run.stdout ?? "")) ?? ""}"`,
    );
  }
}

function unavailable(kind: VmmKind, path: string | undefined, reason: string): VmmBinaryInfo {
  return { kind, path, version: undefined, available: false, unavailableReason: reason };
}

function firstLine(text: string): string | undefined {
  const line = text.trim().split("\n")[0]?.trim();
  return line === "" ? undefined : line;
}
