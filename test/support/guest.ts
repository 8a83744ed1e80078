import { join } from "node:path";
import { repoRoot, run } from "./agent.js";

/**
 * The line the test guest prints on its serial console once it is up (modules loaded, network set,
 * shell starting). Match it against complete lines: a partial read could cut the uptime short.
 */
export const GUEST_READY = /VMENV-GUEST-READY hostname=(\S+) uptime=([\d.]+)/;

/** The line the test guest prints when the ACPI power button (QMP system_powerdown) powers it off. */
export const GUEST_POWEROFF = "VMENV-GUEST-POWEROFF";

let image: Promise<{ kernel: string; initrd: string }> | undefined;

/**
 * The test guest's kernel and initrd, built (once per process; cached on disk across processes) by
 * scripts/guest-image. The first build downloads a Debian kernel package, so it may take a minute.
 */
export function guestImage(): Promise<{ kernel: string; initrd: string }> {
  image ??= (async () => {
    const r = await run(join(repoRoot, "scripts/guest-image"), [], { timeoutMs: 600_000 });
    if (r.code !== 0) throw new Error(`scripts/guest-image failed (${r.code}):\n${r.stderr}`);
    const kernel = /^kernel=(.+)$/m.exec(r.stdout)?.[1];
    const initrd = /^initrd=(.+)$/m.exec(r.stdout)?.[1];
    if (!kernel || !initrd)
      throw new Error(`scripts/guest-image did not print kernel= and initrd= lines:\n${r.stdout}`);
    return { kernel, initrd };
  })();
  // A failed build is not memoized: a later caller tries again.
  image.catch(() => {
    image = undefined;
  });
  return image;
}
