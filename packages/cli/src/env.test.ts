import { create } from "@bufbuild/protobuf";
import { EnvironmentSchema, MemberState } from "@vmenv/api/coordinator/v1";
import { describe, expect, it } from "vitest";
import { envDetail } from "./env.js";

describe("vmenv env get", () => {
  it("shows each member's addresses (given, or chosen by the coordinator on a shared network) when any has one", () => {
    const e = create(EnvironmentSchema, {
      name: "environments/shop",
      node: "nodes/acme",
      members: [
        {
          id: "web-1",
          role: "web",
          kind: "vm",
          state: MemberState.RUNNING,
          agent: "agents/a1",
          vm: "vms/shop-web-1",
          spec: {
            nics: [
              { id: "eth0", network: "networks/lan", ipAddress: "10.9.0.2" },
              { id: "eth1", network: "networks/loc" },
            ],
          },
        },
        { id: "db-1", role: "db", kind: "vm", state: MemberState.STOPPED, spec: {} },
      ],
    });
    const lines = envDetail(e).split("\n").slice(-3);
    expect(lines[0]).toMatch(/^MEMBER +ROLE +KIND +STATE +AGENT +VM +ADDRESSES +OUTPUTS$/);
    expect(lines[1]).toMatch(/^web-1 +web +vm +running +a1 +shop-web-1 +10\.9\.0\.2\b/);
    expect(lines[2]).toMatch(/^db-1 +db +vm +stopped +- +- +-/);
    // Without any address, no column.
    const bare = create(EnvironmentSchema, { members: [{ id: "db-1", spec: {} }] });
    expect(envDetail(bare).split("\n").at(-2)).toMatch(/^MEMBER +ROLE +KIND +STATE +AGENT +VM +OUTPUTS$/);
  });
});
