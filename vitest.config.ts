import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { defineConfig } from "vitest/config";

/**
 * The cloud-hypervisor contract (shared/reference/cloud-hypervisor-openapi.yaml) is public reference data
 * kept outside this repository, beside its checkout. The cloud-hypervisor tests validate against it;
 * where no copy can be found (a checkout far from shared/), they are left out with a loud notice
 * instead of failing for want of a file.
 */
function findChOpenApi(): string | undefined {
  const file = "cloud-hypervisor-openapi.yaml";
  if (process.env.VMENV_CH_OPENAPI) return process.env.VMENV_CH_OPENAPI;
  const dirs = process.env.VMENV_REFERENCE_DIR ? [process.env.VMENV_REFERENCE_DIR] : [];
  for (let d = import.meta.dirname; dirname(d) !== d; d = dirname(d))
    dirs.push(join(d, "shared", "reference"));
  dirs.push("/work/shared/reference");
  return dirs.map((d) => join(d, file)).find((f) => existsSync(f));
}
const chOpenApi = findChOpenApi();
if (chOpenApi) process.env.VMENV_CH_OPENAPI = chOpenApi;
else {
  console.warn(
    "\n*** cloud-hypervisor contract tests LEFT OUT: cloud-hypervisor-openapi.yaml not found " +
      "(set VMENV_REFERENCE_DIR to the shared/reference folder) ***\n",
  );
}
const chTests = chOpenApi
  ? []
  : ["packages/agent/src/vmm/cloud-hypervisor/**", "test/cloud-hypervisor-*.integ.test.ts"];

// Two projects: `unit` (beside the code, fast, no root) and `integ` (under test/, real processes,
// sockets and QEMU). Both resolve workspace packages to their TypeScript sources.
const resolve = { conditions: ["source"] };

export default defineConfig({
  test: {
    projects: [
      {
        resolve,
        ssr: { resolve: { conditions: ["source"] } },
        test: {
          name: "unit",
          include: ["packages/*/src/**/*.test.ts"],
          exclude: chTests,
          testTimeout: 20_000,
        },
      },
      {
        resolve,
        ssr: { resolve: { conditions: ["source"] } },
        test: {
          name: "integ",
          include: ["test/**/*.integ.test.ts"],
          exclude: chTests,
          testTimeout: 120_000,
          hookTimeout: 120_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
