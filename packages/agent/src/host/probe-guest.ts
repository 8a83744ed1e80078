/**
 * The accelerator probe's guest and the reading of its outcome: pure, no I/O. `accel-probe.ts` writes
 * the image to a file, runs QEMU on it and hands the outcome back here.
 *
 * The guest is a multiboot kernel (QEMU's `-kernel` loads it through SeaBIOS and its multiboot option
 * ROM, which enters the guest in 32-bit protected mode with paging off). It spins a counted loop, then
 * writes 0x31 to the `isa-debug-exit` port, which makes QEMU exit with status (0x31 << 1) | 1 = 99. Any
 * other ending (timeout, QEMU error, reset) means the accelerator did not run the guest.
 *
 * Why the loop: on a host where /dev/kvm is provided by software (here: the `kvm_pvm` module inside a
 * Firecracker VM, with no vmx/svm in the CPU flags) KVM does run guest code, but at about 1 µs per
 * instruction — a Linux guest takes minutes to get past its decompressor, which looks like a hang. A
 * guest that only writes the exit port finishes there in about 3 s and would pass; 10 million
 * iterations take a few ms on hardware KVM, ~60 ms under TCG and about 10 s on such a host.
 */

/** Guest physical address the image is loaded at (1 MiB, the usual multiboot kernel address). */
export const PROBE_GUEST_LOAD_ADDRESS = 0x100000;
/** I/O port of the `isa-debug-exit` device the QEMU command line adds. */
export const PROBE_EXIT_PORT = 0xf4;
/** Value the guest writes to {@link PROBE_EXIT_PORT}. */
export const PROBE_EXIT_VALUE = 0x31;
/** QEMU's exit status when the guest wrote {@link PROBE_EXIT_VALUE}: (value << 1) | 1. */
export const PROBE_EXIT_STATUS = (PROBE_EXIT_VALUE << 1) | 1;
/** Loop iterations the guest runs before exiting; see the module comment. */
export const DEFAULT_PROBE_SPIN_ITERATIONS = 10_000_000;

const MULTIBOOT_MAGIC = 0x1badb002;
/** Bit 16: the header's address fields are valid (the "a.out kludge"), so no ELF is needed. */
const MULTIBOOT_FLAG_ADDRESSES = 0x0001_0000;
const HEADER_SIZE = 32;
/**
 * Image size. QEMU reads the first bytes of `-kernel` looking for a Linux boot header ("HdrS" at
 * 0x202) before it tries multiboot; a padded image keeps that read inside zeroed bytes.
 */
const IMAGE_SIZE = 4096;

/**
 * Builds the probe guest: a multiboot header (magic, flags with bit 16, checksum, header/load/load-end/
 * bss-end/entry addresses) followed at offset 32 by
 *
 *     mov ecx, spinIterations   ; B9 imm32      (left out when spinIterations is 0)
 * 1:  dec ecx                   ; 49
 *     jnz 1b                    ; 75 FD
 *     mov al, 0x31              ; B0 31
 *     out 0xf4, al              ; E6 F4
 * 2:  hlt                       ; F4
 *     jmp 2b                    ; EB FD
 */
export function buildProbeKernel(spinIterations: number = DEFAULT_PROBE_SPIN_ITERATIONS): Uint8Array {
  if (!Number.isInteger(spinIterations) || spinIterations < 0 || spinIterations > 0xffff_ffff) {
    throw new RangeError(`spinIterations must be an integer in [0, 2^32-1], got ${spinIterations}`);
  }
  const image = new Uint8Array(IMAGE_SIZE);
  const view = new DataView(image.buffer);
  const base = PROBE_GUEST_LOAD_ADDRESS;
  const header = [
    MULTIBOOT_MAGIC,
    MULTIBOOT_FLAG_ADDRESSES,
    -(MULTIBOOT_MAGIC + MULTIBOOT_FLAG_ADDRESSES) >>> 0, // checksum: the three fields sum to 0 mod 2^32
    base, // header_addr: the header is the image's first byte
    base, // load_addr
    base + IMAGE_SIZE, // load_end_addr: load the whole image
    0, // bss_end_addr: no bss
    base + HEADER_SIZE, // entry_addr
  ];
  header.forEach((word, i) => {
    view.setUint32(i * 4, word, true);
  });
  const code: number[] = [];
  if (spinIterations > 0) {
    code.push(0xb9, ...le32(spinIterations), 0x49, 0x75, 0xfd);
  }
  code.push(0xb0, PROBE_EXIT_VALUE, 0xe6, PROBE_EXIT_PORT, 0xf4, 0xeb, 0xfd);
  image.set(code, HEADER_SIZE);
  return image;
}

/** What happened to one probe run, as the adapter observed it. */
export interface ProbeRunOutcome {
  /** QEMU's exit status; undefined when it did not exit by itself. */
  exitCode: number | undefined;
  /** Signal that ended QEMU, if one did (e.g. "SIGKILL" after the timeout). */
  signal: string | undefined;
  /** The probe's time limit ran out and QEMU was killed. */
  timedOut: boolean;
  /** Node's error code when QEMU could not be started at all ("ENOENT", "EACCES" …). */
  spawnErrorCode: string | undefined;
  /** QEMU's standard error. */
  stderr: string;
  /** Binary that was run, for messages. */
  qemuPath: string;
  durationMs: number;
  timeoutMs: number;
}

export interface ProbeVerdict {
  usable: boolean;
  detail: string;
}

/** Turns an observed probe run into usable/not usable and a one-line explanation. */
export function judgeProbeRun(run: ProbeRunOutcome): ProbeVerdict {
  const ms = Math.round(run.durationMs);
  if (run.spawnErrorCode !== undefined) {
    const why =
      run.spawnErrorCode === "ENOENT"
        ? "not found"
        : run.spawnErrorCode === "EACCES"
          ? "not executable"
          : `could not be started (${run.spawnErrorCode})`;
    return { usable: false, detail: `QEMU binary ${run.qemuPath} ${why}` };
  }
  if (run.timedOut) {
    return {
      usable: false,
      detail: `probe guest did not finish within ${formatLimit(run.timeoutMs)} (guest hangs)`,
    };
  }
  if (run.exitCode === PROBE_EXIT_STATUS) {
    return { usable: true, detail: `probe guest exited through isa-debug-exit in ${ms} ms` };
  }
  const complaint = firstQemuComplaint(run.stderr);
  if (complaint !== undefined) return { usable: false, detail: `qemu: ${complaint}` };
  if (run.signal !== undefined) {
    return { usable: false, detail: `QEMU was ended by ${run.signal} after ${ms} ms` };
  }
  if (run.exitCode === 0) {
    return {
      usable: false,
      detail: "probe guest reset or shut down before reaching isa-debug-exit (QEMU exit status 0)",
    };
  }
  return { usable: false, detail: `QEMU exited with status ${run.exitCode ?? "unknown"} without a message` };
}

/**
 * The first line of QEMU's stderr that is not a warning, without QEMU's "<binary>: " prefix, e.g.
 * "Could not access KVM kernel module: No such file or directory" or "-accel bogus: invalid accelerator
 * bogus".
 */
export function firstQemuComplaint(stderr: string): string | undefined {
  for (const raw of stderr.split("\n")) {
    const line = raw.trim().replace(/^\S*qemu[^\s:]*:\s*/, "");
    if (line === "" || /^warning:/i.test(line)) continue;
    return line;
  }
  return undefined;
}

function formatLimit(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms} ms`;
}

function le32(value: number): number[] {
  return [value & 0xff, (value >>> 8) & 0xff, (value >>> 16) & 0xff, (value >>> 24) & 0xff];
}
