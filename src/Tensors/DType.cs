namespace PaliGemma.CpuOnly.Tensors;

/// <summary>Element types a checkpoint tensor can hold, named as in the safetensors header.</summary>
public enum DType
{
    F32,
    BF16,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

public static class DTypeInfo
{
    public static int SizeOf(this DType dtype) => dtype switch
    {
        DType.F64 or DType.I64 => 8,
        DType.F32 or DType.I32 => 4,
        DType.BF16 or DType.F16 or DType.I16 => 2,
        DType.I8 or DType.U8 or DType.Bool => 1,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>Parses the dtype string of a safetensors header ("F32", "BF16", ...); null when unknown.</summary>
    public static DType? Parse(string name) => name switch
    {
        "F32" => DType.F32,
        "BF16" => DType.BF16,
        "F16" => DType.F16,
        "F64" => DType.F64,
        "I64" => DType.I64,
        "I32" => DType.I32,
        "I16" => DType.I16,
        "I8" => DType.I8,
        "U8" => DType.U8,
        "BOOL" => DType.Bool,
        _ => null,
    };

    public static string ToHeaderName(this DType dtype) => dtype == DType.Bool ? "BOOL" : dtype.ToString();

    /// <summary>True for the floating types the kernels read in place (fp32, and bf16/f16 upconverted in registers).</summary>
    public static bool IsKernelFloat(this DType dtype) => dtype is DType.F32 or DType.BF16 or DType.F16;
}
