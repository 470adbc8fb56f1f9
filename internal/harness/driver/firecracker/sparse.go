package firecracker

import (
	"errors"
	"syscall"
)

// isCrossDevice reports whether err is a rename or link across file
// systems.
func isCrossDevice(err error) bool { return errors.Is(err, syscall.EXDEV) }
