package qemu

import "github.com/invokex/invokex/internal/guest"

func defaultCacheDir() string { return guest.DefaultCacheDir() }

func defaultKernel(cacheDir string) (string, bool) { return guest.KernelPath(cacheDir) }
