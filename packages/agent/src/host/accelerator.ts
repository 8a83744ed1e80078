import type { AcceleratorInfo } from "./inventory.js";

/** The `accelerator` setting: a fixed choice, or `auto`. */
export type AcceleratorSetting = "auto" | "kvm" | "tcg";

/**
 * The accelerator new VMs get. `auto` picks KVM only when its probe proved a guest runs on it; an
 * explicit setting is obeyed as is (the operator knows best, and the inventory shows the probe's view).
 */
export function effectiveAccelerator(
  setting: AcceleratorSetting,
  probed: readonly AcceleratorInfo[],
): "kvm" | "tcg" {
  if (setting !== "auto") return setting;
  return probed.some((a) => a.kind === "kvm" && a.usable) ? "kvm" : "tcg";
}
