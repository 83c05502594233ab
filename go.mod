module healthcare

go 1.24

toolchain go1.27.3

require github.com/lib/pq v1.12.3
