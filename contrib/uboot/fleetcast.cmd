# Fleetcast's A/B selection for U-Boot (Specs/agent.md §3.4, §3.2). Run it
# from the board's boot command before loading a kernel (as a boot script:
# mkimage -A arm -T script -C none -n fleetcast -d fleetcast.cmd boot.scr, then
# `source`), with a redundant environment (CONFIG_SYS_REDUNDAND_ENVIRONMENT)
# that the agent's fw_env.config names too. It sets `fleetcast_slot` to A or B
# and `fleetcast_bootargs` to fleetcast.side=<slot>; the board's own commands
# then load that slot's kernel and add ${fleetcast_bootargs} to bootargs (the
# agent reads the side it booted from the kernel command line).
#
#   BOOT_ORDER            "A B" or "B A": the sides in the order they are tried (RAUC's)
#   BOOT_A_OK, BOOT_B_OK  1: the side may boot
#   BOOT_A_TRY, BOOT_B_TRY 1: the side is on trial (not confirmed)
#   BOOT_A_LEFT, BOOT_B_LEFT trial boots left (RAUC's), hexadecimal as setexpr
#                         writes it, 0 to a; counted down here, one per boot
#
# A confirmed side boots as it is; a side on trial boots while it has boots
# left, one spent and saved (saveenv writes the other copy) before it boots;
# with none left the confirmed side boots. An environment without these
# variables leaves the defaults below: side A, as shipped.

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_OK}" || setenv BOOT_A_OK 1
test -n "${BOOT_A_TRY}" || setenv BOOT_A_TRY 0
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 0
test -n "${BOOT_B_OK}" || setenv BOOT_B_OK 0
test -n "${BOOT_B_TRY}" || setenv BOOT_B_TRY 0
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 0

setenv fleetcast_slot
for BOOT_SLOT in ${BOOT_ORDER}; do
  if test -n "${fleetcast_slot}"; then
    echo "fleetcast: ${fleetcast_slot} chosen, ${BOOT_SLOT} not tried"
  elif test "${BOOT_SLOT}" = "A"; then
    if test "${BOOT_A_OK}" = 1 -a "${BOOT_A_TRY}" = 0; then
      setenv fleetcast_slot A
    elif test "${BOOT_A_OK}" = 1 -a 0x${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      saveenv
      setenv fleetcast_slot A
    fi
  elif test "${BOOT_SLOT}" = "B"; then
    if test "${BOOT_B_OK}" = 1 -a "${BOOT_B_TRY}" = 0; then
      setenv fleetcast_slot B
    elif test "${BOOT_B_OK}" = 1 -a 0x${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      saveenv
      setenv fleetcast_slot B
    fi
  fi
done

if test -z "${fleetcast_slot}"; then
  echo "fleetcast: no side bootable by the environment; booting A as shipped"
  setenv fleetcast_slot A
fi
echo "fleetcast: booting side ${fleetcast_slot}"
setenv fleetcast_bootargs "fleetcast.side=${fleetcast_slot}"
