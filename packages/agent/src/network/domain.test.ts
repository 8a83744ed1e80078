import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import {
  allocateIp,
  checkCidr,
  checkHostAddress,
  checkIfname,
  checkMac,
  cidrOf,
  networkIdFromName,
  overlaps,
  parseCidr,
  parseIp,
  portFromName,
} from "./domain.js";
import { bridgeNameFor, macFor, tapNameFor } from "./names.js";

const reason = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return e instanceof VmenvError ? `${e.code} ${e.reason}` : String(e);
  }
  return "no error";
};

describe("CIDR arithmetic", () => {
  it("parses addresses and subnets", () => {
    expect(parseIp("10.0.0.1")).toBe(0x0a000001);
    expect(parseIp("255.255.255.255")).toBe(0xffffffff);
    expect(parseIp("256.0.0.1")).toBeUndefined();
    expect(parseIp("01.2.3.4")).toBeUndefined();
    expect(parseCidr("10.20.0.0/24")).toEqual({ base: 0x0a140000, prefix: 24, size: 256 });
    expect(parseCidr("10.20.0.1/24")).toBeUndefined();
  });

  it("refuses what is not a usable subnet, with a clear reason", () => {
    expect(reason(() => checkCidr("nonsense", "cidr"))).toBe("invalid-argument INVALID_CIDR");
    expect(reason(() => checkCidr("10.0.0.0/31", "cidr"))).toBe("invalid-argument INVALID_CIDR");
    expect(reason(() => checkCidr("10.0.0.1/32", "cidr"))).toBe("invalid-argument INVALID_CIDR");
    expect(reason(() => checkCidr("10.0.0.0/33", "cidr"))).toBe("invalid-argument INVALID_CIDR");
    expect(reason(() => checkCidr("", "cidr"))).toBe("invalid-argument INVALID_CIDR");
    expect(() => checkCidr("10.0.0.5/24", "cidr")).toThrow(/did you mean 10.0.0.0\/24/);
    expect(checkCidr("10.0.0.0/30", "cidr").size).toBe(4);
  });

  it("detects overlaps", () => {
    const a = checkCidr("10.1.0.0/16", "c");
    expect(overlaps(a, checkCidr("10.1.5.0/24", "c"))).toBe(true);
    expect(overlaps(a, checkCidr("10.2.0.0/24", "c"))).toBe(false);
    expect(overlaps(a, cidrOf(parseIp("10.1.255.1") ?? 0, 8))).toBe(true);
  });

  it("checks host addresses", () => {
    const c = checkCidr("10.0.0.0/24", "c");
    expect(checkHostAddress(c, "10.0.0.1", "g")).toBe(0x0a000001);
    expect(reason(() => checkHostAddress(c, "10.0.1.1", "g"))).toBe(
      "invalid-argument IP_ADDRESS_OUTSIDE_CIDR",
    );
    expect(reason(() => checkHostAddress(c, "10.0.0.255", "g"))).toBe("invalid-argument INVALID_IP_ADDRESS");
    expect(reason(() => checkHostAddress(c, "10.0.0.0", "g"))).toBe("invalid-argument INVALID_IP_ADDRESS");
  });
});

describe("address allocation", () => {
  const c = checkCidr("10.0.0.0/29", "c"); // hosts .1-.6
  it("hands out the lowest free address, skipping the gateway", () => {
    const used = new Map<string, string>();
    const got: string[] = [];
    for (let i = 0; i < 5; i++) {
      const ip = allocateIp(c, "10.0.0.1", used, undefined, "n");
      used.set(ip, `p${i}`);
      got.push(ip);
    }
    expect(got).toEqual(["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
    expect(reason(() => allocateIp(c, "10.0.0.1", used, undefined, "n"))).toBe(
      "resource-exhausted NETWORK_FULL",
    );
    used.delete("10.0.0.4");
    expect(allocateIp(c, "10.0.0.1", used, undefined, "n")).toBe("10.0.0.4");
  });

  it("honours a wanted address when it is free and usable", () => {
    const used = new Map([["10.0.0.3", "networks/n/ports/a-eth0"]]);
    expect(allocateIp(c, "10.0.0.1", used, "10.0.0.5", "n")).toBe("10.0.0.5");
    expect(reason(() => allocateIp(c, "10.0.0.1", used, "10.0.0.3", "n"))).toBe(
      "failed-precondition IP_ADDRESS_IN_USE",
    );
    expect(reason(() => allocateIp(c, "10.0.0.1", used, "10.0.0.1", "n"))).toBe(
      "invalid-argument IP_ADDRESS_IS_GATEWAY",
    );
    expect(reason(() => allocateIp(c, "10.0.0.1", used, "10.0.0.7", "n"))).toBe(
      "invalid-argument INVALID_IP_ADDRESS",
    );
    expect(reason(() => allocateIp(c, "10.0.0.1", used, "10.0.1.2", "n"))).toBe(
      "invalid-argument IP_ADDRESS_OUTSIDE_CIDR",
    );
  });
});

describe("names and MACs", () => {
  it("derives short, deterministic interface names", () => {
    const b = bridgeNameFor("web");
    expect(b).toMatch(/^vme-[0-9a-f]{11}$/);
    expect(b.length).toBe(15);
    expect(bridgeNameFor("web")).toBe(b);
    expect(bridgeNameFor("db")).not.toBe(b);
    const t = tapNameFor("vm1", "eth0");
    expect(t).toMatch(/^vmt-[0-9a-f]{11}$/);
    expect(tapNameFor("vm1", "eth0")).toBe(t);
    expect(tapNameFor("vm1", "eth1")).not.toBe(t);
  });

  it("derives locally administered unicast MACs from VM and NIC", () => {
    const m = macFor("vm1", "eth0");
    expect(m).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    expect(macFor("vm1", "eth0")).toBe(m);
    expect(macFor("vm1", "eth1")).not.toBe(m);
    expect(checkMac(m, "mac")).toBe(m);
    expect(checkMac("52:54:00:AB:CD:EF", "mac")).toBe("52:54:00:ab:cd:ef");
    expect(reason(() => checkMac("01:00:5e:00:00:01", "mac"))).toBe("invalid-argument INVALID_MAC_ADDRESS");
    expect(reason(() => checkMac("52:54:00:00:00", "mac"))).toBe("invalid-argument INVALID_MAC_ADDRESS");
  });

  it("refuses unsafe names", () => {
    expect(reason(() => checkIfname("br0;rm -rf /", "b"))).toBe("invalid-argument INVALID_INTERFACE_NAME");
    expect(reason(() => checkIfname("a-very-long-bridge", "b"))).toBe(
      "invalid-argument INVALID_INTERFACE_NAME",
    );
    expect(reason(() => checkIfname("../x", "b"))).toBe("invalid-argument INVALID_INTERFACE_NAME");
    expect(reason(() => networkIdFromName("networks/../x"))).toBe("invalid-argument INVALID_NETWORK_ID");
    expect(reason(() => networkIdFromName("networks/a$(id)"))).toBe("invalid-argument INVALID_NETWORK_ID");
    expect(reason(() => networkIdFromName("web"))).toBe("invalid-argument INVALID_NETWORK_NAME");
    expect(networkIdFromName("web", "n", true)).toBe("web");
    expect(portFromName("networks/web/ports/vm1-eth0")).toEqual(["web", "vm1-eth0"]);
    expect(reason(() => portFromName("networks/web/ports/../x"))).toBe("invalid-argument INVALID_PORT_NAME");
  });
});
