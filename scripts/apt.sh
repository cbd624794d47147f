# shellcheck shell=bash
# Sourced by scripts/setup.sh and bench/setup.sh: one way to install Debian packages that are missing.
#
# apt_install_missing LABEL PKG...: installs the packages that are not installed yet (as root, or
# with sudo), quietly; returns 0 when it installed something, 1 when nothing was missing.
apt_install_missing() {
  local label="$1"
  shift
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ "${#missing[@]}" -gt 0 ] || return 1
  APT_SUDO=""
  [ "$(id -u)" -eq 0 ] || APT_SUDO="sudo"
  echo "$label: installing ${missing[*]}" >&2
  $APT_SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $APT_SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
