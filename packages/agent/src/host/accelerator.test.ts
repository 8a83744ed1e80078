import { describe, expect, it } from "vitest";
import { effectiveAccelerator } from "./accelerator.js";
import type { AcceleratorInfo } from "./inventory.js";

const probe = (kind: "kvm" | "tcg", usable: boolean): AcceleratorInfo => ({
  kind,
  present: true,
  usable,
  detail: "",
  probeDurationMs: 1,
});

describe("effectiveAccelerator", () => {
  it("auto picks KVM only when its probe ran a guest", () => {
    expect(effectiveAccelerator("auto", [probe("kvm", true), probe("tcg", true)])).toBe("kvm");
    expect(effectiveAccelerator("auto", [probe("kvm", false), probe("tcg", true)])).toBe("tcg");
    expect(effectiveAccelerator("auto", [])).toBe("tcg");
  });
  it("an explicit setting wins over the probe", () => {
    expect(effectiveAccelerator("tcg", [probe("kvm", true)])).toBe("tcg");
    expect(effectiveAccelerator("kvm", [probe("kvm", false)])).toBe("kvm");
  });
});
