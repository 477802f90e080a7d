using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Imaging;

/// <summary>The project's .npy reader with the int shapes and typed views the imaging tests use.</summary>
internal sealed class ImagingNpy
{
    private readonly NpyArray _array;

    private ImagingNpy(NpyArray array) => _array = array;

    public int[] Shape => _array.Shape.Select(d => checked((int)d)).ToArray();

    public static ImagingNpy Read(string path) => new(Npy.Read(path));

    public byte[] AsUInt8() => _array.ToUInt8();

    public float[] AsFloat32() => _array.ToFloat32();
}
