import { describe, expect, it } from "vitest";
import { ConfigError, coordinatorCommand, resolveConfig } from "./config.js";

/** The settings for `args`, as `vmenv-coordinator ...args` would have them. */
function resolve(args: string[]) {
  const cmd = coordinatorCommand("9.8.7").exitOverride();
  cmd.parse(["node", "vmenv-coordinator", ...args], { from: "node" });
  return resolveConfig(cmd);
}

describe("coordinator settings: the rebalancer", () => {
  it("runs every 30 s at an 85% watermark with a 5 minute cooldown by default; 0 turns it off", () => {
    expect(resolve([])).toMatchObject({
      rebalanceIntervalMs: 30_000,
      rebalanceWatermark: 0.85,
      rebalanceCooldownMs: 300_000,
    });
    expect(
      resolve(["--rebalance-interval-ms", "0", "--rebalance-watermark", "1", "--rebalance-cooldown-ms", "0"]),
    ).toMatchObject({ rebalanceIntervalMs: 0, rebalanceWatermark: 1, rebalanceCooldownMs: 0 });
  });

  it("refuses a watermark outside (0, 1] and an interval too short to be meant", () => {
    for (const bad of ["0", "1.2", "-0.5", "85%", ""])
      expect(() => resolve(["--rebalance-watermark", bad])).toThrow(
        /--rebalance-watermark must be a fraction greater than 0 and at most 1/,
      );
    expect(() => resolve(["--rebalance-interval-ms", "10"])).toThrow(ConfigError);
    expect(() => resolve(["--rebalance-cooldown-ms", "-1"])).toThrow(
      /--rebalance-cooldown-ms must be an integer ≥ 0/,
    );
  });
});
