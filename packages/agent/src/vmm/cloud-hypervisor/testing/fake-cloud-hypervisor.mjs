#!/usr/bin/env node
// A stand-in for the `cloud-hypervisor` binary, for tests on hosts where the VMM cannot run: give its
// path to the driver as the binary. The logic is TypeScript (fake-vmm.ts, reusing fake-api.ts), loaded
// through tsx (a root devDependency), so this works from the source tree only.
import { register } from "tsx/esm/api";

register();
const { main } = await import("./fake-vmm.ts");
process.exit(await main(process.argv.slice(2)));
