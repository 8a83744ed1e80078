import { create } from "@bufbuild/protobuf";
import { RebalanceFleetResponseSchema } from "@vmenv/api/coordinator/v1";
import { describe, expect, it } from "vitest";
import { parseFraction, rebalanceText } from "./agent.js";

describe("vmenv agent rebalance", () => {
  it("takes the watermark as a fraction or a percentage", () => {
    expect(parseFraction("0.85")).toBe(0.85);
    expect(parseFraction("85%")).toBe(0.85);
    expect(() => parseFraction("lots")).toThrow(/not a fraction/);
  });

  it("prints the move with both agents' loads before and after, or why nothing moves", () => {
    const r = create(RebalanceFleetResponseSchema, {
      watermark: 0.85,
      moves: [
        {
          environment: "environments/shop",
          memberId: "web-1",
          usage: { vms: 1, vcpus: 2, memoryBytes: 512n * 1024n * 1024n },
          sourceAgent: "agents/a1",
          destinationAgent: "agents/a3",
          sourceLoadBefore: 0.9,
          sourceLoadAfter: 0.775,
          destinationLoadBefore: 0,
          destinationLoadAfter: 0.125,
          operation: "operations/0mx-1",
        },
      ],
    });
    expect(rebalanceText(r, false).split("\n")).toEqual([
      "moving (watermark 85%):",
      "MEMBER      VCPUS  MEMORY     FROM  LOAD         TO  LOAD        OPERATION",
      "shop/web-1  2      512.0 MiB  a1    90% → 77.5%  a3  0% → 12.5%  operations/0mx-1",
    ]);
    expect(
      rebalanceText(
        create(RebalanceFleetResponseSchema, { watermark: 0.85, reason: "no READY agents" }),
        true,
      ),
    ).toBe("nothing to move (watermark 85%): no READY agents");
  });
});
