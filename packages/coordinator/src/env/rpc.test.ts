import { create } from "@bufbuild/protobuf";
import { AffinityEnforcement, AffinityType, MemberSchema } from "@vmenv/api/coordinator/v1";
import { describe, expect, it } from "vitest";
import { checkMembers, envIdFromName } from "./rpc.js";

const MIB = 1024n * 1024n;
const boot = { method: { case: "directKernel" as const, value: { kernelPath: "/k" } } };
const init = (id: string, role = "web") => ({ id, role, spec: { vcpus: 1, memoryBytes: 128n * MIB, boot } });
const good = (id: string, role = "web") => create(MemberSchema, init(id, role));

describe("member checks", () => {
  it("accepts a sound environment", () => {
    const m = create(MemberSchema, {
      id: "db-1",
      role: "db",
      spec: {
        vcpus: 2,
        maxVcpus: 4,
        memoryBytes: 256n * MIB,
        boot,
        disks: [{ id: "d", volume: "volumes/data" }],
      },
      volumes: [{ id: "data", sizeBytes: 64n * MIB }],
      placement: {
        affinityRules: [
          { type: AffinityType.ANTI_AFFINITY, enforcement: AffinityEnforcement.HARD, roles: ["web"] },
          { type: AffinityType.AFFINITY, enforcement: AffinityEnforcement.SOFT, memberIds: ["web-1"] },
        ],
      },
    });
    expect(checkMembers("shop", [good("web-1"), m], (i) => `environment.members[${i}]`)).toEqual([]);
  });

  it("names every offending field", () => {
    const bad = create(MemberSchema, {
      id: "web-1",
      kind: "teapot",
      spec: {
        vcpus: 0,
        maxVcpus: 300,
        memoryBytes: 1000n,
        disks: [{ id: "d", volume: "volumes/nope" }],
      },
      volumes: [
        { id: "v", sizeBytes: 0n },
        { id: "v", sizeBytes: 1000n },
      ],
      placement: {
        agent: "host-1",
        affinityRules: [
          {
            type: AffinityType.UNSPECIFIED,
            enforcement: AffinityEnforcement.HARD,
            roles: ["ghost"],
            memberIds: ["x"],
          },
        ],
      },
    });
    const fields = checkMembers(
      "shop",
      [good("web-1"), bad, good("Bad_Id")],
      (i) => `environment.members[${i}]`,
    ).map((v) => v.field);
    expect(fields).toEqual([
      "environment.members[1].id",
      "environment.members[1].kind",
      "environment.members[1].spec.vcpus",
      "environment.members[1].spec.max_vcpus",
      "environment.members[1].spec.memory_bytes",
      "environment.members[1].spec.boot",
      "environment.members[1].spec.disks[0].volume",
      "environment.members[1].volumes[0].size_bytes",
      "environment.members[1].volumes[1].id",
      "environment.members[1].volumes[1].size_bytes",
      "environment.members[1].placement.agent",
      "environment.members[1].placement.affinity_rules[0].type",
      "environment.members[1].placement.affinity_rules[0].member_ids[0]",
      "environment.members[1].placement.affinity_rules[0].roles[0]",
      "environment.members[2].id",
    ]);
  });

  it("refuses ids whose VM or volume ids would not fit the agent's 63 characters", () => {
    const env = "e".repeat(40);
    const m = create(MemberSchema, {
      ...init("m".repeat(22)),
      volumes: [{ id: "data", sizeBytes: 512n }],
      spec: { vcpus: 1, memoryBytes: 128n * MIB, boot },
    });
    expect(checkMembers(env, [m], () => "member").map((v) => v.field)).toEqual(["member.volumes[0].id"]);
    expect(checkMembers(env, [good("m".repeat(22))], () => "member")).toEqual([]);
    expect(checkMembers(env, [good("m".repeat(23))], () => "member").map((v) => v.field)).toEqual([
      "member.id",
    ]);
  });

  it("checks a member added to an existing environment against its members", () => {
    const others = [{ id: "web-1", role: "web" }];
    expect(checkMembers("shop", [good("web-1")], () => "member", others).map((v) => v.field)).toEqual([
      "member.id",
    ]);
    const m = create(MemberSchema, {
      ...init("web-2"),
      placement: {
        affinityRules: [
          { type: AffinityType.ANTI_AFFINITY, enforcement: AffinityEnforcement.HARD, memberIds: ["web-1"] },
        ],
      },
    });
    expect(checkMembers("shop", [m], () => "member", others)).toEqual([]);
  });

  it("parses environment names", () => {
    expect(envIdFromName("environments/shop")).toBe("shop");
    expect(() => envIdFromName("shop")).toThrow(
      expect.objectContaining({ reason: "INVALID_ENVIRONMENT_NAME" }),
    );
    expect(() => envIdFromName("environments/Shop")).toThrow(
      expect.objectContaining({ reason: "INVALID_ENVIRONMENT_NAME" }),
    );
  });
});
