import { defineConfig } from "vitest/config";

// Two projects: `unit` (beside the code, fast, no root) and `integ` (under test/, real processes,
// sockets and QEMU). Both resolve workspace packages to their TypeScript sources.
const resolve = { conditions: ["source"] };

export default defineConfig({
  test: {
    projects: [
      {
        resolve,
        ssr: { resolve: { conditions: ["source"] } },
        test: { name: "unit", include: ["packages/*/src/**/*.test.ts"], testTimeout: 20_000 },
      },
      {
        resolve,
        ssr: { resolve: { conditions: ["source"] } },
        test: {
          name: "integ",
          include: ["test/**/*.integ.test.ts"],
          testTimeout: 120_000,
          hookTimeout: 120_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
