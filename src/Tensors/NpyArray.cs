using System.Runtime.InteropServices;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>An array read from a NumPy <c>.npy</c> file: dtype string, shape, and the raw little-endian C-order bytes.</summary>
public sealed class NpyArray
{
    internal NpyArray(string descrType, long[] shape, byte[] data, string sourceName)
    {
        DescrType = descrType;
        Shape = shape;
        Data = data;
        SourceName = sourceName;
    }

    /// <summary>The NumPy dtype string, e.g. <c>"&lt;f4"</c>.</summary>
    public string DescrType { get; }

    public long[] Shape { get; }

    /// <summary>Raw little-endian element bytes in C (row-major) order.</summary>
    public byte[] Data { get; }

    /// <summary>The file or stream name the array was read from (for error messages).</summary>
    public string SourceName { get; }

    public long ElementCount
    {
        get
        {
            long count = 1;
            foreach (long dim in Shape) count *= dim;
            return count;
        }
    }

    /// <summary>The elements as fp32: a copy of <c>&lt;f4</c> data, or <c>&lt;f8</c> data rounded to fp32.</summary>
    public float[] ToFloat32()
    {
        switch (DescrType)
        {
            case Npy.Float32Descr:
                return MemoryMarshal.Cast<byte, float>(Data).ToArray();
            case Npy.Float64Descr:
                var doubles = MemoryMarshal.Cast<byte, double>(Data);
                var result = new float[doubles.Length];
                for (int i = 0; i < result.Length; i++) result[i] = (float)doubles[i];
                return result;
            default:
                throw WrongType(nameof(ToFloat32), "'<f4' or '<f8'");
        }
    }

    /// <summary>The elements as int64, widened from <c>&lt;i8</c>, <c>&lt;i4</c>, <c>|u1</c> or <c>|b1</c>.</summary>
    public long[] ToInt64()
    {
        switch (DescrType)
        {
            case Npy.Int64Descr:
                return MemoryMarshal.Cast<byte, long>(Data).ToArray();
            case Npy.Int32Descr:
                var ints = MemoryMarshal.Cast<byte, int>(Data);
                var fromInts = new long[ints.Length];
                for (int i = 0; i < fromInts.Length; i++) fromInts[i] = ints[i];
                return fromInts;
            case Npy.UInt8Descr:
            case Npy.BoolDescr:
                var fromBytes = new long[Data.Length];
                for (int i = 0; i < fromBytes.Length; i++) fromBytes[i] = Data[i];
                return fromBytes;
            default:
                throw WrongType(nameof(ToInt64), "'<i8', '<i4', '|u1' or '|b1'");
        }
    }

    /// <summary>A copy of <c>|u1</c> (or <c>|b1</c>) data.</summary>
    public byte[] ToUInt8()
    {
        if (DescrType is not (Npy.UInt8Descr or Npy.BoolDescr))
            throw WrongType(nameof(ToUInt8), "'|u1' or '|b1'");
        return (byte[])Data.Clone();
    }

    private InvalidOperationException WrongType(string method, string wanted) =>
        new($"{SourceName}: {method} needs dtype {wanted} but the array is '{DescrType}' {TensorData.FormatShape(Shape)}");
}
